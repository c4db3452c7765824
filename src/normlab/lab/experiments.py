"""The lab's experiments: each one command, a table, a plot, and the published numbers beside ours.

    normlab experiment d2l            # full form (slow on a laptop CPU)
    normlab experiment d2l --quick    # minutes: a subset of the data, fewer epochs and seeds

Every experiment writes into ``<out>/<name>`` (``<name>-quick`` for the quick form; ``out`` defaults to ``runs``):
``table.md`` (title, settings, a Markdown table, notes), ``results.json`` and one or more PNGs. Each training run
lives in its own sub-directory with the usual ``config.json`` / ``metrics.jsonl`` / checkpoint, so an interrupted
experiment resumes where it stopped and a finished one is re-tabulated without retraining.

Statistics: where a number is statistical, the table shows mean +- std over seeds (population std, ``--seeds``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import plots
from .data import Split, load_fashion_mnist
from .models import norm_layers
from .train import TrainConfig, TrainingError, evaluate, train


@dataclass
class Context:
    """What every experiment gets: quick or full, seeds, where to write, the data loaded once."""
    quick: bool = False
    seeds: int | None = None          # None: the experiment's default (3 full, 2 quick)
    out: str = "runs"
    impl: str = "normlab"
    threads: int | None = None
    data_dir: str | None = None
    verify_data: bool = True
    budget: int | None = None         # batch-size: training examples per run (None: 60,000 full, 4,000 quick)
    log: Callable[[str], None] = print
    _data: tuple[Split, Split] | None = field(default=None, repr=False)

    @property
    def data(self) -> tuple[Split, Split]:
        if self._data is None:
            self._data = load_fashion_mnist(self.data_dir, verify=self.verify_data)
        return self._data

    def seed_list(self, full: int = 3, quick: int = 2) -> list[int]:
        return list(range(self.seeds if self.seeds is not None else (quick if self.quick else full)))

    def dir(self, name: str) -> Path:
        path = Path(self.out) / (f"{name}-quick" if self.quick else name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, exp_dir: Path, tag: str, on_step=None, **overrides) -> dict:
        """Train one configuration into ``exp_dir/tag`` (resuming if it is there) and return train()'s result."""
        cfg = TrainConfig(out=str(exp_dir / tag), impl=self.impl, threads=self.threads, data_dir=self.data_dir,
                          verify_data=self.verify_data, progress=False, plots=False)
        cfg = replace(cfg, **overrides)
        self.log(f"--- {tag}: {cfg.model}/{cfg.norm}/{cfg.impl} lr {cfg.lr} batch {cfg.batch_size} "
                 f"epochs {cfg.epochs} seed {cfg.seed}")
        return train(cfg, data=self.data, on_step=on_step, log=lambda s: self.log("    " + s))


def mean_std(values) -> str:
    values = np.asarray(list(values), dtype=float)
    if len(values) == 0 or np.all(np.isnan(values)):
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _write(exp_dir: Path, name: str, title: str, settings: str, table: str, notes: str, pngs: list[str],
           results: dict, ctx: Context, started: float, form_note: str = "") -> dict:
    form = ("quick form (`--quick`)" if ctx.quick else "full form") + form_note
    wall = time.perf_counter() - started
    text = (f"## {title}\n\n*{form}; {settings}; norm layers from `{ctx.impl}`; wall time {wall:.0f} s.*\n\n"
            f"{table}\n\n{notes}\n")
    (exp_dir / "table.md").write_text(text)
    summary = {"name": name, "title": title, "quick": ctx.quick, "settings": settings,
               "plots": [Path(p).name for p in pngs], "results": results}
    (exp_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return {**summary, "table_md": text, "dir": str(exp_dir)}


def _last(result: dict, key: str) -> float:
    return result["metrics"][-1][key] if result["metrics"] else float("nan")


# ============================================================================================ 1. d2l
D2L_PUBLISHED = {  # d2l-zh, chapter "batch normalization", LeNet on Fashion-MNIST, 10 epochs, batch 256
    "bn-scratch": (0.273, 0.899, 0.807),
    "bn-concise": (0.267, 0.902, 0.708),   # a rerun of d2l's notebook gave test 0.853: test acc varies a lot
    "none": (0.469, 0.823, 0.779),         # d2l's LeNet chapter (no BN), lr 0.9
}


def exp_d2l(ctx: Context) -> dict:
    """LeNet with BN (lr 1.0; from scratch and as layers) vs without (lr 0.9), batch 256, as in d2l."""
    started, exp_dir = time.perf_counter(), ctx.dir("d2l")
    size = dict(train_subset=5000, test_subset=2000, epochs=3) if ctx.quick else dict(epochs=10)
    layer_impl = ctx.impl
    configs = [("bn-scratch", dict(norm="bn", impl="scratch", lr=1.0)),
               ("bn-concise", dict(norm="bn", impl=layer_impl, lr=1.0)),
               ("none", dict(norm="none", lr=0.9))]
    runs: dict[str, list] = {}
    for tag, kw in configs:
        runs[tag] = [ctx.run(exp_dir, f"{tag}-s{s}", model="lenet", batch_size=256, seed=s, **kw, **size)
                     for s in ctx.seed_list()]
    rows, results = [], {}
    for tag, _ in configs:
        rs = runs[tag]
        vals = {k: [_last(r, k) for r in rs] for k in
                ("train_loss", "train_acc", "test_acc", "test_acc_batch_stats", "examples_per_s")}
        pub = D2L_PUBLISHED[tag]
        label = {"bn-scratch": "BN from scratch", "bn-concise": f"BN layers ({layer_impl})", "none": "no BN"}[tag]
        rows.append([label, mean_std(vals["train_loss"]), mean_std(vals["train_acc"]), mean_std(vals["test_acc"]),
                     mean_std(vals["test_acc_batch_stats"]), f"{np.mean(vals['examples_per_s']):,.0f}",
                     f"{pub[0]:.3f} / {pub[1]:.3f} / {pub[2]:.3f}"])
        results[tag] = vals
    table = _table(["model", "train loss", "train acc", "test acc", "test acc (batch stats)", "examples/s",
                    "d2l: loss / train / test"], rows)
    png = plots.plot_curves_grid({"BN from scratch": [r["metrics"] for r in runs["bn-scratch"]],
                                  f"BN layers ({layer_impl})": [r["metrics"] for r in runs["bn-concise"]],
                                  "no BN": [r["metrics"] for r in runs["none"]]},
                                 exp_dir / "d2l_curves.png", "LeNet on Fashion-MNIST, batch 256")
    size_txt = "5,000 training / 2,000 test images, 3 epochs" if ctx.quick else "60,000 / 10,000 images, 10 epochs"
    notes = ("d2l numbers: d2l-zh, LeNet with and without batch norm, 10 epochs on the full data (BN lr 1.0, "
             "no BN lr 0.9). Its BN test accuracy swings between runs (0.708 in the book, 0.853 in a rerun): with "
             "lr 1.0 the running statistics trail the weights, which the batch-stats column shows.")
    if ctx.quick:
        notes += (" The quick form trains 60 steps only; sigmoid LeNet without BN is still at chance there, as in "
                  "d2l's first epoch: that gap is the point of batch norm.")
    return _write(exp_dir, "d2l", "1. LeNet with and without batch norm (d2l)",
                  f"LeNet, batch 256, {size_txt}, {len(ctx.seed_list())} seeds", table, notes, [png], results,
                  ctx, started)


# ============================================================================================ 2. BN paper MNIST
def exp_bn_paper(ctx: Context) -> dict:
    """Ioffe & Szegedy's section 4.1 on Fashion-MNIST: 3x100 sigmoid MLP, batch 60, test acc and sigmoid inputs."""
    started, exp_dir = time.perf_counter(), ctx.dir("bn-paper")
    steps = 3000 if ctx.quick else 50_000
    every = 250 if ctx.quick else 1000
    probe_x = ctx.data[1].subset(2000).float_images()
    probe_y = ctx.data[1].subset(2000).labels
    curves, pct, results, early = {}, {}, {}, {}
    for norm in ("bn", "none"):
        finals, firsts = [], []
        for seed in ctx.seed_list(full=3, quick=2):
            track = {"steps": [], "acc": [], "pct": []}

            def on_step(info, track=track):
                if info["step"] % every and info["step"] != 1:
                    return
                model = info["model"]
                sigmoids = [m for m in model.modules() if isinstance(m, torch.nn.Sigmoid)]
                captured = {}
                handle = sigmoids[-1].register_forward_hook(
                    lambda mod, inp, out: captured.__setitem__("x", inp[0][:, 0].detach()))
                acc, _ = evaluate(model, probe_x, probe_y)
                handle.remove()
                track["steps"].append(info["step"])
                track["acc"].append(acc)
                track["pct"].append(np.percentile(captured["x"].numpy(), [15, 50, 85]).tolist())

            ctx.run(exp_dir, f"{norm}-s{seed}", on_step=on_step, model="bn-paper-mlp", norm=norm, batch_size=60, lr=0.5,
                        epochs=10**6, max_steps=steps, seed=seed, test_subset=2000, resume=False)
            finals.append(track["acc"][-1] if track["acc"] else float("nan"))
            firsts.append(track["acc"][1] if len(track["acc"]) > 1 else float("nan"))  # at step `every`
            if seed == 0:
                curves[norm], pct[norm] = track, (track["steps"], np.array(track["pct"]))
        results[norm], early[norm] = finals, firsts
    label = {"bn": "with BN", "none": "without BN"}
    png1 = plots.plot_lines({label[k]: (v["steps"], v["acc"], None) for k, v in curves.items()},
                            exp_dir / "bn_paper_test_acc.png", xlabel="training step", ylabel="test accuracy",
                            title="3x100 sigmoid MLP, batch 60 (seed 0)")
    png2 = plots.plot_percentiles({f"{label[k]}": v for k, v in pct.items()}, exp_dir / "bn_paper_sigmoid.png",
                                  "input of one last-layer sigmoid: 15/50/85th percentiles")
    rows = [[label[k], mean_std(early[k]), mean_std(results[k]),
             f"{np.ptp(np.array(curves[k]['pct'])[:, 1]):.2f}"] for k in ("bn", "none")]
    table = _table(["network", f"test acc @ {every:,} steps", f"test acc @ {steps:,} steps",
                    "drift of the median sigmoid input, seed 0 (max - min)"], rows)
    notes = ("Paper (Ioffe & Szegedy 2015, Fig. 1; MNIST, 50,000 steps, batch 60): the BN network reaches higher "
             "test accuracy sooner, and its sigmoid inputs keep a stable distribution while those of the plain "
             "network drift over training. Ours is Fashion-MNIST (harder), lr 0.5, weights N(0, 0.1^2); the "
             "percentiles are over 2,000 test images for unit 0 of the last hidden layer. Read the two accuracy "
             "columns together: BN's advantage is speed early in training; at this learning rate the plain "
             "network catches up, and its final accuracy may match or pass BN's, while the drift column shows "
             "the stability claim.")
    return _write(exp_dir, "bn-paper", "2. The BN paper's MNIST experiment", f"batch 60, {steps:,} steps, "
                  f"{len(ctx.seed_list())} seeds", table, notes, [png1, png2], results, ctx, started)


# ============================================================================================ 3. batch size
def _lr(batch_size: int) -> float:
    """The linear scaling rule of the GN paper's protocol (Goyal et al. 2017): lr 0.02 at batch 32, and in
    proportion."""
    return 0.02 * batch_size / 32


# Two models, because what BN's statistics see at batch size B differs: in lenet-relu (BN after the conv layers)
# each channel's statistics cover B * H * W values, in the mlp (BN on fc features) only B.
_BATCH_SIZE_MODELS = {"lenet-relu": ["bn", "batchrenorm", "switchnorm", "gn", "ln", "in", "none"],
                      "mlp": ["bn", "batchrenorm", "switchnorm", "gn", "ln", "none"]}  # fc features: no IN
_NORM_NAMES = {"bn": "BatchNorm", "gn": "GroupNorm", "ln": "LayerNorm", "in": "InstanceNorm", "none": "none",
               "batchrenorm": "Batch Renorm (normlab)", "switchnorm": "Switchable Norm (normlab)"}


def exp_batch_size(ctx: Context) -> dict:
    """BN vs GN vs LN vs IN vs none across batch sizes at a fixed budget of training examples, conv and fc BN."""
    started, exp_dir = time.perf_counter(), ctx.dir("batch-size")
    sizes = [2, 8, 32, 128] if ctx.quick else [2, 4, 8, 16, 32, 64, 128]
    budget = ctx.budget or (4000 if ctx.quick else 60_000)
    acc = {m: {n: {b: [] for b in sizes} for n in norms} for m, norms in _BATCH_SIZE_MODELS.items()}
    for model, norms in _BATCH_SIZE_MODELS.items():
        for norm in norms:
            for b in sizes:
                for seed in ctx.seed_list(full=3, quick=1):
                    r = ctx.run(exp_dir, f"{model}-{norm}-b{b}-s{seed}", model=model, norm=norm, batch_size=b,
                                lr=_lr(b), momentum=0.9, epochs=1, train_subset=budget,
                                test_subset=2000 if ctx.quick else None, seed=seed)
                    acc[model][norm][b].append(_last(r, "test_acc"))
    # Batch size 1: a fc BN has one value per channel and must refuse; a conv BN still has H*W values per
    # channel and trains, silently turning into instance norm (and its running statistics into per-image ones).
    b1 = {}
    for model in _BATCH_SIZE_MODELS:
        try:
            ctx.run(exp_dir, f"{model}-bn-b1", model=model, norm="bn", batch_size=1, lr=_lr(1), epochs=1,
                    train_subset=20, test_subset=20, checkpoint=False, resume=False)
            b1[model] = "trains (conv-only BN normalizes each image by its own statistics)"
        except TrainingError as err:
            b1[model] = f"`{err}`"
    rows = [[f"{model}: {_NORM_NAMES[n]}"] + [mean_std(acc[model][n][b]) for b in sizes]
            for model, norms in _BATCH_SIZE_MODELS.items() for n in norms]
    table = _table(["model: norm \\ batch size"] + [str(b) for b in sizes], rows)
    pngs = [plots.plot_lines({_NORM_NAMES[n]: (sizes, [np.mean(acc[model][n][b]) for b in sizes],
                                               [np.std(acc[model][n][b]) for b in sizes]) for n in norms},
                             exp_dir / f"batch_size_{model.replace('-', '_')}.png", xlabel="batch size",
                             ylabel="test accuracy (running stats)", logx=True,
                             title=f"{model}, {budget:,} training examples, lr 0.02 x B/32, momentum 0.9")
            for model, norms in _BATCH_SIZE_MODELS.items()]
    notes = (f"Batch size 1 with BatchNorm: mlp (BN on fc features) stops with {b1['mlp']}; lenet-relu (BN after "
             f"conv layers only) {b1['lenet-relu']}.\n\n"
             "What BN's statistics see: in lenet-relu each BN channel is normalized over B x 12 x 12 (first layer) "
             "or B x 4 x 4 (second) values, in the mlp over B values only, so the mlp shows the small-batch effect "
             "at a given B far more than the conv net.\n\n"
             "Published: Wu & He, Group Normalization (2018), ResNet-50 on ImageNet: at batch size 2 per GPU, GN's "
             "error is 10.6 points lower than BN's, while at 32 they are close. BN's test accuracy uses running "
             "statistics gathered from tiny, noisy batches; GN, LN and IN do not depend on the batch. Ioffe (2017) "
             "proposes Batch Renormalization for small or non-i.i.d. batches; Luo et al. (2019) Switchable "
             "Normalization learns a mix of BN, IN and LN statistics.\n\n"
             "Protocol: as in the GN paper, the learning rate scales linearly with the batch size (lr 0.02 x B / "
             "32), so each batch size covers the same budget with comparable SGD noise; at one fixed learning rate "
             "a batch of 2 takes 16 times as many steps as a batch of 32, each as large and far noisier, and the "
             "effect of the optimizer would be mixed with the norm's. Test accuracy uses the running statistics.")
    if budget < 60_000:
        notes += (f"\n\nEvery run here makes one pass over {budget:,} examples (the full form: 60,000): at batch size "
                  f"2 that is {budget // 2:,} noisy steps, and these small models are far from the ImageNet ResNet-50 "
                  "of the GN paper. Where the table disagrees with the published trend, run the full form before "
                  "drawing a conclusion.")
    return _write(exp_dir, "batch-size", "3. Batch size: BN vs GN vs LN vs IN vs none (and BRN, SN)",
                  f"lenet-relu and mlp, fixed budget of {budget:,} examples, SGD momentum 0.9 with lr 0.02 x batch "
                  f"size / 32 (linear scaling), {len(ctx.seed_list(3, 1))} seed(s)",
                  table, notes, pngs, {m: {n: {str(b): v for b, v in d.items()} for n, d in per.items()}
                                       for m, per in acc.items()}, ctx, started,
                  form_note=f", budget `--budget {ctx.budget}`" if ctx.budget else "")


# ============================================================================================ 4. placement
def exp_placement(ctx: Context) -> dict:
    """Norm before vs after the activation (LeNet with sigmoid, LeNet-ReLU)."""
    started, exp_dir = time.perf_counter(), ctx.dir("placement")
    size = dict(train_subset=5000, test_subset=2000, epochs=3) if ctx.quick else dict(epochs=10)
    models = [("lenet", 1.0, 0.0), ("lenet-relu", 0.02, 0.9)]
    rows, results, series = [], {}, {}
    for model, lr, mom in models:
        for placement in ("before", "after"):
            rs = [ctx.run(exp_dir, f"{model}-{placement}-s{s}", model=model, norm="bn", placement=placement, lr=lr,
                          momentum=mom, batch_size=256 if model == "lenet" else 64, seed=s, **size)
                  for s in ctx.seed_list()]
            key = f"{model} / BN {placement} activation"
            results[key] = [_last(r, "test_acc") for r in rs]
            rows.append([key, mean_std(_last(r, "train_loss") for r in rs), mean_std(_last(r, "train_acc") for r in rs),
                         mean_std(results[key])])
            series[key] = ([m["epoch"] for m in rs[0]["metrics"]],
                           np.mean([[m["test_acc"] for m in r["metrics"]] for r in rs], 0),
                           np.std([[m["test_acc"] for m in r["metrics"]] for r in rs], 0))
    table = _table(["model / placement", "train loss", "train acc", "test acc"], rows)
    png = plots.plot_lines(series, exp_dir / "placement.png", xlabel="epoch", ylabel="test accuracy",
                           title="BN before vs after the activation")
    notes = ("The BN paper normalizes the pre-activation (`BN(Wx+b)` then the nonlinearity) and d2l follows it; "
             "many practitioners report BN after ReLU works as well or better. Placement matters most for "
             "saturating activations: after a sigmoid, BN only rescales already-squashed values.")
    return _write(exp_dir, "placement", "4. Placement: norm before vs after the activation",
                  "lenet (batch 256, lr 1.0) and lenet-relu (batch 64, lr 0.02, momentum 0.9), "
                  f"{len(ctx.seed_list())} seeds", table, notes, [png], results, ctx, started)


# ============================================================================================ 5. learning rate
def exp_lr(ctx: Context) -> dict:
    """With vs without BN over learning rates (LeNet, sigmoid): BN widens the range of usable rates."""
    started, exp_dir = time.perf_counter(), ctx.dir("lr")
    lrs = [0.03, 0.3, 1.0, 3.0, 10.0] if ctx.quick else [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
    size = dict(train_subset=4000, test_subset=2000, epochs=2) if ctx.quick else dict(epochs=5)
    acc = {"bn": {}, "none": {}}
    for norm in acc:
        for lr in lrs:
            vals = []
            for s in ctx.seed_list(full=3, quick=1):
                try:
                    r = ctx.run(exp_dir, f"{norm}-lr{lr}-s{s}", model="lenet", norm=norm, lr=lr, batch_size=256,
                                seed=s, **size)
                    vals.append(_last(r, "test_acc"))
                except TrainingError as err:  # diverged: record chance level
                    ctx.log(f"    diverged: {err}")
                    vals.append(0.1)
            acc[norm][lr] = vals
    label = {"bn": "with BN", "none": "without BN"}
    rows = [[label[n]] + [mean_std(acc[n][lr]) for lr in lrs] for n in acc]
    table = _table(["LeNet \\ lr"] + [str(lr) for lr in lrs], rows)
    png = plots.plot_lines({label[n]: (lrs, [np.mean(acc[n][lr]) for lr in lrs], [np.std(acc[n][lr]) for lr in lrs])
                            for n in acc}, exp_dir / "lr.png", xlabel="learning rate", ylabel="test accuracy",
                           logx=True, title="LeNet (sigmoid), SGD, batch 256")
    notes = ("A diverged run (NaN loss) counts as chance, 0.1. Published: the BN paper trains Inception with a "
             "5x and 30x larger learning rate once BN is in (section 4.2); d2l uses lr 1.0 with BN vs 0.9 without.")
    return _write(exp_dir, "lr", "5. Learning rate with and without batch norm",
                  f"LeNet, batch 256, {size['epochs']} epochs" + (" on 4,000 images" if ctx.quick else ""),
                  table, notes, [png], {n: {str(k): v for k, v in d.items()} for n, d in acc.items()}, ctx, started)


# ============================================================================================ 6. train vs eval
def exp_train_eval(ctx: Context) -> dict:
    """Test accuracy with running statistics vs batch statistics over training, for several BN momenta."""
    started, exp_dir = time.perf_counter(), ctx.dir("train-eval")
    momenta = [0.01, 0.1, 0.5, None]
    size = dict(train_subset=5000, epochs=2, batch_size=128) if ctx.quick else dict(epochs=5, batch_size=256)
    every = 6 if ctx.quick else 50
    probe = ctx.data[1].subset(1000)
    px, py = probe.float_images(), probe.labels
    curves, rows = {}, []
    for mom in momenta:
        track = {"steps": [], "running": [], "batch": []}

        def on_step(info, track=track):
            if info["step"] % every:
                return
            track["steps"].append(info["step"])
            track["running"].append(evaluate(info["model"], px, py)[0])
            track["batch"].append(evaluate(info["model"], px, py, batch_size=size["batch_size"], batch_stats=True)[0])

        name = "None (cumulative)" if mom is None else str(mom)
        result = ctx.run(exp_dir, f"momentum-{name.split()[0]}", on_step=on_step, model="lenet", norm="bn",
                         lr=1.0, bn_momentum=mom, seed=0, test_subset=2000, resume=False, **size)
        curves[name] = track
        gap = np.array(track["batch"]) - np.array(track["running"])
        rows.append([name, f"{_last(result, 'test_acc'):.3f}", f"{_last(result, 'test_acc_batch_stats'):.3f}",
                     f"{np.mean(np.abs(gap)):.3f}", f"{gap.max():.3f}"])
    table = _table(["BN momentum", "final test acc (running)", "final test acc (batch stats)",
                    "mean abs gap over training", "largest gap"], rows)
    series = {}
    for name, t in curves.items():
        series[f"{name} running"] = (t["steps"], t["running"], None)
    series["0.1 batch stats"] = (curves["0.1"]["steps"], curves["0.1"]["batch"], None)
    png = plots.plot_lines(series, exp_dir / "train_eval.png", xlabel="step", ylabel="accuracy (1,000 test images)",
                           title="LeNet BN, lr 1.0: running vs batch statistics")
    notes = ("Momentum is torch's (weight of the new batch; None = cumulative average over all batches). With 0.01 "
             "the running statistics lag the fast-changing weights and eval-mode accuracy trails batch-stat "
             "accuracy; with None the average keeps the stale early statistics forever. Keras/Flax/d2l's "
             "momentum 0.9/0.99 is 0.1/0.01 here.")
    return _write(exp_dir, "train-eval", "6. Running vs batch statistics over training",
                  f"LeNet BN, lr 1.0, {size['epochs']} epochs, batch {size['batch_size']}, seed 0", table, notes,
                  [png], curves, ctx, started)


# ============================================================================================ 7. gamma/beta
def exp_gamma_beta(ctx: Context) -> dict:
    """Distributions of the learned gamma (scale) and beta (shift) of each BN layer of LeNet."""
    started, exp_dir = time.perf_counter(), ctx.dir("gamma-beta")
    size = dict(train_subset=5000, test_subset=2000, epochs=3) if ctx.quick else dict(epochs=10)
    panels = {"gamma": {}, "beta": {}}
    rows, results = [], {}
    for model, lr, mom in [("lenet", 1.0, 0.0), ("lenet-relu", 0.02, 0.9)]:
        r = ctx.run(exp_dir, f"{model}-s0", model=model, norm="bn", lr=lr, momentum=mom,
                    batch_size=256 if model == "lenet" else 64, seed=0, **size)
        for name, layer in norm_layers(r["model"]):
            g, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
            key = f"{model}[{name}]"
            panels["gamma"][key], panels["beta"][key] = g, b
            results[key] = {"gamma_mean": float(g.mean()), "gamma_std": float(g.std()),
                            "beta_mean": float(b.mean()), "beta_std": float(b.std())}
            rows.append([key, len(g), f"{g.mean():.2f} ± {g.std():.2f}", f"{g.min():.2f} .. {g.max():.2f}",
                         f"{b.mean():.2f} ± {b.std():.2f}", f"{b.min():.2f} .. {b.max():.2f}"])
    table = _table(["layer", "channels", "gamma mean ± std", "gamma range", "beta mean ± std", "beta range"], rows)
    png = plots.plot_histograms(panels, exp_dir / "gamma_beta.png", "learned BN scale (gamma) and shift (beta)")
    notes = ("gamma starts at 1 and beta at 0. Where gamma grows the layer undoes part of the normalization; "
             "a gamma near 0 switches a channel off. Before a sigmoid, |gamma| sets how far into the nonlinear "
             "range the channel reaches.")
    return _write(exp_dir, "gamma-beta", "7. Learned gamma and beta per layer",
                  "lenet (lr 1.0) and lenet-relu (lr 0.02, momentum 0.9), seed 0", table, notes, [png], results,
                  ctx, started)


# ============================================================================================ 8. RNN
def exp_rnn(ctx: Context) -> dict:
    """Row-by-row RNN: LayerNorm vs per-time-step BatchNorm vs none."""
    started, exp_dir = time.perf_counter(), ctx.dir("rnn")
    size = dict(train_subset=5000, test_subset=2000, epochs=2) if ctx.quick else dict(epochs=10)
    label = {"ln": "LayerNorm", "bn": "BatchNorm per time step", "none": "none"}
    rows, results, series = [], {}, {}
    for norm in ("ln", "bn", "none"):
        rs = [ctx.run(exp_dir, f"{norm}-s{s}", model="rnn", norm=norm, lr=0.05, momentum=0.9, batch_size=64, seed=s,
                      **size) for s in ctx.seed_list()]
        results[norm] = [_last(r, "test_acc") for r in rs]
        rows.append([label[norm], mean_std(_last(r, "train_loss") for r in rs),
                     mean_std(_last(r, "train_acc") for r in rs), mean_std(results[norm]),
                     mean_std(_last(r, "test_acc_batch_stats") for r in rs)])
        series[label[norm]] = ([m["epoch"] for m in rs[0]["metrics"]],
                               np.mean([[m["test_acc"] for m in r["metrics"]] for r in rs], 0),
                               np.std([[m["test_acc"] for m in r["metrics"]] for r in rs], 0))
    table = _table(["norm", "train loss", "train acc", "test acc", "test acc (batch stats)"], rows)
    png = plots.plot_lines(series, exp_dir / "rnn.png", xlabel="epoch", ylabel="test accuracy",
                           title="Elman RNN over 28 rows, hidden 128")
    notes = ("Published: Ba et al. (2016) introduce LayerNorm for recurrent nets, where BN needs statistics per "
             "time step (Cooijmans et al. 2017, 'Recurrent Batch Normalization', which keeps separate statistics "
             "for each step, as here). Both stabilize the tanh recurrence relative to no norm.")
    return _write(exp_dir, "rnn", "8. Recurrent net: LayerNorm vs per-step BatchNorm vs none",
                  f"batch 64, SGD lr 0.05 momentum 0.9, {size['epochs']} epochs, {len(ctx.seed_list())} seeds",
                  table, notes, [png], results, ctx, started)


EXPERIMENTS: dict[str, Callable[[Context], dict]] = {
    "d2l": exp_d2l,
    "bn-paper": exp_bn_paper,
    "batch-size": exp_batch_size,
    "placement": exp_placement,
    "lr": exp_lr,
    "train-eval": exp_train_eval,
    "gamma-beta": exp_gamma_beta,
    "rnn": exp_rnn,
}


def _register_tool_experiments() -> None:
    """The practitioner-tool experiments live in experiments_tools.py, which imports this module."""
    from .experiments_tools import exp_domain_shift, exp_fold, exp_precise_bn
    EXPERIMENTS.update({"domain-shift": exp_domain_shift, "precise-bn": exp_precise_bn, "fold": exp_fold})


_register_tool_experiments()


def run_experiment(name: str, ctx: Context) -> dict:
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} or 'all'")
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    return EXPERIMENTS[name](ctx)

