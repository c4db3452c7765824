"""``normlab train | experiment | report | demo``: the lab's subcommands (registered by ``normlab.cli``)."""
from __future__ import annotations

import argparse
import sys

from .models import IMPLS, MODELS, NORMS, PLACEMENTS

EXPERIMENT_NAMES = ["d2l", "bn-paper", "batch-size", "placement", "lr", "train-eval", "gamma-beta", "rnn",
                    "domain-shift", "precise-bn", "fold"]  # = experiments.EXPERIMENTS (kept here: fast --help)


def _momentum(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="directory with the four Fashion-MNIST IDX files (raw or .gz); default: "
                                      "$NORMLAB_DATA, the repo's data/fashion-mnist, ~/.cache/normlab/fashion-mnist, "
                                      "/usr/share/datasets/fashion-mnist")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check (for a dataset of your own)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one model on Fashion-MNIST",
                              description="Train one model; rerunning the same command resumes an interrupted run.")
    p.add_argument("--model", default="lenet", choices=MODELS)
    p.add_argument("--norm", default="bn", help=f"one of {NORMS} (or a normlab.create_norm name); default bn")
    p.add_argument("--impl", default="normlab", choices=IMPLS, help="where the norm layers come from")
    p.add_argument("--placement", default="before", choices=PLACEMENTS, help="norm before or after the activation")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many SGD steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.9)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--bn-momentum", type=_momentum, default=0.1,
                   help="running-stats momentum, torch convention (weight of the new batch); 'none' = cumulative")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N images only")
    p.add_argument("--test-subset", type=int, default=None, help="test on the first N images only")
    p.add_argument("--out", default=None, help="run directory (default runs/train/MODEL-NORM-lrLR-sSEED)")
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out and start over")
    p.add_argument("--download", action="store_true", help="fetch missing data from the official mirror")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (normlab.lab.distributed); --batch-size is global")
    p.add_argument("--bn-policy", default="sync", choices=["sync", "local", "average"],
                   help="with --nproc > 1: BN statistics over the global batch (sync), per rank (local), or per "
                        "rank with running statistics averaged before evaluation (average)")
    _data_args(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("experiment", help="run one of the lab's experiments (table + plot)",
                              description="Experiments: " + ", ".join(EXPERIMENT_NAMES) + " (or 'all').")
    p.add_argument("name", choices=EXPERIMENT_NAMES + ["all"])
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 2 or 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="short form: data subset, fewer epochs/seeds")
    p.add_argument("--out", default="runs", help="results root (default runs/)")
    p.add_argument("--impl", default="normlab", choices=IMPLS, help="norm layers to use")
    p.add_argument("--budget", type=int, default=None,
                   help="batch-size only: training examples per run (default 60,000; 4,000 with --quick)")
    _data_args(p)
    p.set_defaults(func=cmd_experiment)

    p = subparsers.add_parser("report", help="gather every experiment's table and plots into docs/report.md")
    p.add_argument("--runs", default="runs", help="results root to read (default runs/)")
    p.add_argument("--docs", default="docs", help="where report.md and its PNGs go (default docs/)")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("demo", help="the quick d2l experiment: LeNet with vs without BN (a few minutes)")
    p.add_argument("--full", action="store_true", help="the full form (10 epochs on all data, 3 seeds)")
    p.add_argument("--out", default="runs", help="results root (default runs/)")
    p.add_argument("--impl", default="normlab", choices=IMPLS)
    _data_args(p)
    p.set_defaults(func=cmd_demo)


def cmd_train(args) -> int:
    from .data import DataError
    from .train import TrainConfig, TrainingError, train
    out = args.out or f"runs/train/{args.model}-{args.norm}-lr{args.lr:g}-s{args.seed}"
    cfg = TrainConfig(model=args.model, norm=args.norm, impl=args.impl, placement=args.placement,
                      bn_momentum=args.bn_momentum, epochs=args.epochs, max_steps=args.max_steps,
                      batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                      weight_decay=args.weight_decay, seed=args.seed, data_dir=args.data_dir,
                      verify_data=not args.no_verify, download=args.download, train_subset=args.train_subset,
                      test_subset=args.test_subset, out=out, threads=args.threads, progress=not args.no_progress,
                      resume=not args.fresh)
    try:
        if args.nproc > 1 or _under_torchrun():
            from .distributed import train_distributed
            result = train_distributed(cfg, args.nproc, args.bn_policy)
        else:
            result = train(cfg)
    except (DataError, TrainingError, ValueError) as err:
        print(f"normlab train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to resume from the last checkpoint in {out}",
              file=sys.stderr)
        return 130
    if result.get("metrics") and result.get("rank", 0) == 0:  # under torchrun, rank 0 speaks for all
        last = result["metrics"][-1]
        print(f"done: epoch {last['epoch']}, train acc {last['train_acc']:.3f}, test acc {last['test_acc']:.3f}; "
              f"run directory {out} (config.json, metrics.jsonl, checkpoint, curves.png)")
    return 0


def _under_torchrun() -> bool:
    import os
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ  # started by torchrun


def _context(args):
    from .experiments import Context
    return Context(quick=getattr(args, "quick", False), seeds=getattr(args, "seeds", None), out=args.out,
                   impl=args.impl, threads=args.threads, data_dir=args.data_dir, verify_data=not args.no_verify,
                   budget=getattr(args, "budget", None))


def cmd_experiment(args) -> int:
    from .data import DataError
    from .experiments import EXPERIMENTS, run_experiment
    if args.budget is not None and (args.name not in ("batch-size", "all") or args.budget < 1):
        print(f"normlab experiment: error: --budget {args.budget} is a positive number of training examples per "
              f"run of the batch-size experiment; {args.name} takes no budget", file=sys.stderr)
        return 2
    ctx = _context(args)
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    try:
        for name in names:
            result = run_experiment(name, ctx)
            print("\n" + result["table_md"])
            print(f"results in {result['dir']} ({', '.join(result['plots'])}, table.md, results.json)")
    except DataError as err:
        print(f"normlab experiment: error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    path = write_report(args.runs, args.docs)
    print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from .data import DataError
    from .experiments import run_experiment
    args.quick = not args.full
    args.seeds = None
    ctx = _context(args)
    print("normlab demo: LeNet on Fashion-MNIST with and without batch norm, as in d2l "
          f"({'full form: 10 epochs on all data, 3 seeds' if args.full else 'quick form: a data subset'})",
          flush=True)
    try:
        result = run_experiment("d2l", ctx)
    except DataError as err:
        print(f"normlab demo: error: {err}", file=sys.stderr)
        return 1
    print("\n" + result["table_md"])
    print(f"plots and tables in {result['dir']}/ ({', '.join(result['plots'])}, table.md); every run's "
          f"metrics.jsonl and checkpoint in its sub-directory. Full form: normlab demo --full")
    return 0
