"""Experiments with the practitioner tools of ``normlab.tools``: AdaBN under domain shift, precise BN, folding.

    normlab experiment domain-shift [--quick]   # adapt_bn (AdaBN) on shifted test images, doctor's verdict
    normlab experiment precise-bn [--quick]     # EMA running statistics vs recompute_bn_stats over k batches
    normlab experiment fold [--quick]           # fold_bn: equivalence, accuracy and inference time

Same conventions as :mod:`normlab.lab.experiments`: each writes ``table.md``, ``results.json`` and PNGs into
``<out>/<name>`` (``<name>-quick``), and its training runs resume from their checkpoints.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import plots
from .experiments import Context, _table, _write, mean_std
from .train import evaluate

__all__ = ["exp_domain_shift", "exp_precise_bn", "exp_fold", "SHIFTS", "shift_images"]

# LeNet with BN as in d2l: sigmoid, batch 256, SGD lr 1.0.
_LENET = dict(model="lenet", norm="bn", lr=1.0, batch_size=256)
# The domain-shift source model: same LeNet, SGD with momentum, which converges faster on a subset.
_LENET_SOURCE = dict(model="lenet", norm="bn", lr=0.1, momentum=0.9, batch_size=128)
_LENET_RELU = dict(model="lenet-relu", norm="bn", lr=0.02, momentum=0.9, batch_size=64)


# ----------------------------------------------------------------------------------------------- helpers
def _last(result: dict, key: str) -> float:
    return result["metrics"][-1][key] if result["metrics"] else float("nan")


def _batches(x: torch.Tensor, batch_size: int, seed: int | None = None) -> Iterator[torch.Tensor]:
    """``x`` in batches (shuffled by ``seed`` when given); a final batch of one is dropped (no batch variance)."""
    if seed is None:
        order = torch.arange(len(x))
    else:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < 2:
            break
        yield x[idx]


def _bars(groups: list[str], series: dict[str, tuple[list[float], list[float] | None]], path: Path, *,
          ylabel: str, title: str, ylim: tuple[float, float] | None = None, ax=None) -> str | None:
    """Grouped bars: one group per entry of ``groups``, one bar per series ``label -> (means, stds or None)``."""
    import matplotlib.pyplot as plt
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(groups) + 2), 3.6))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (label, (means, stds)) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, np.asarray(means, float), width, label=label,
               yerr=None if stds is None else np.asarray(stds, float), capsize=2, color=f"C{i}")
    ax.set_xticks(x)
    ax.set_xticklabels([g.replace(" (", "\n(") for g in groups], fontsize=7)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return plots._save(fig, path) if own else None


# ============================================================================================ domain shift
def _noise(x: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(12345)
    return (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp_(0, 1)


# Pixels are float32 in [0, 1] (data.Split.float_images, d2l's ToTensor; no further normalization).
SHIFTS = {
    "clean": lambda x: x,
    "inverted (1 - x)": lambda x: 1 - x,
    "low contrast (0.5x + 0.25)": lambda x: 0.5 * x + 0.25,
    "noise (+N(0, 0.3²), clipped)": _noise,
    "brighter (x + 0.4, clipped)": lambda x: (x + 0.4).clamp(0, 1),
}


def shift_images(name: str, x: torch.Tensor) -> torch.Tensor:
    """The shifted version ``name`` (a key of ``SHIFTS``) of images ``x`` in [0, 1]."""
    return SHIFTS[name](x)


def exp_domain_shift(ctx: Context) -> dict:
    """Covariate shift at test time, and AdaBN (``adapt_bn``) on unlabeled shifted images."""
    from normlab.tools import adapt_bn, doctor
    started, exp_dir = time.perf_counter(), ctx.dir("domain-shift")
    size = dict(train_subset=10_000, test_subset=2000, epochs=3) if ctx.quick else dict(epochs=5)
    test = ctx.data[1].subset(4000 if ctx.quick else None)
    x_all, y_all = test.float_images(), test.labels
    half = len(y_all) // 2  # adapt on the first half (labels unused), evaluate on the second
    x_adapt, x_eval, y_eval = x_all[:half], x_all[half:], y_all[half:]
    seeds = ctx.seed_list(full=3, quick=2)
    acc = {s: {"source": [], "adabn": []} for s in SHIFTS}
    flags = {s: {"source": [], "adabn": []} for s in SHIFTS}
    rel = {s: {"source": [], "adabn": []} for s in SHIFTS}
    for seed in seeds:
        model = ctx.run(exp_dir, f"lenet-bn-s{seed}", seed=seed, **_LENET_SOURCE, **size)["model"].eval()
        for name, fn in SHIFTS.items():
            xa, xe = fn(x_adapt), fn(x_eval)
            adapted = adapt_bn(copy.deepcopy(model), _batches(xa, 256))
            sample = xe[:256]
            for key, net in (("source", model), ("adabn", adapted)):
                acc[name][key].append(evaluate(net, xe, y_eval)[0])
                report = doctor(net, sample)
                flags[name][key].append(len(report.by_code("train-eval-mismatch")))
                rel[name][key].append(report.output_rel_diff if report.output_rel_diff is not None else float("nan"))
            ctx.log(f"    seed {seed} {name}: {acc[name]['source'][-1]:.3f} -> AdaBN {acc[name]['adabn'][-1]:.3f}")
    rows = []
    for name in SHIFTS:
        gain = np.array(acc[name]["adabn"]) - np.array(acc[name]["source"])
        rows.append([name, mean_std(acc[name]["source"]), mean_std(acc[name]["adabn"]), mean_std(gain),
                     f"{sum(flags[name]['source'])}/{len(seeds)} → {sum(flags[name]['adabn'])}/{len(seeds)}",
                     f"{np.nanmean(rel[name]['source']):.0%} → {np.nanmean(rel[name]['adabn']):.0%}"])
    table = _table(["test images", "test acc (source statistics)", "test acc (AdaBN)", "AdaBN gain",
                    "doctor: train-eval-mismatch (runs flagged)", "doctor: train/eval output diff"], rows)
    n_before = sum(sum(flags[s]["source"]) for s in SHIFTS)
    n_after = sum(sum(flags[s]["adabn"]) for s in SHIFTS)
    png = _bars(list(SHIFTS), {"source statistics": ([np.mean(acc[s]["source"]) for s in SHIFTS],
                                                     [np.std(acc[s]["source"]) for s in SHIFTS]),
                               "AdaBN (adapt_bn)": ([np.mean(acc[s]["adabn"]) for s in SHIFTS],
                                                    [np.std(acc[s]["adabn"]) for s in SHIFTS])},
                exp_dir / "domain_shift.png", ylabel="test accuracy", ylim=(0, 1),
                title=f"LeNet-BN under covariate shift ({len(seeds)} seed(s)); AdaBN on unlabeled shifted images")
    train_txt = ("10,000 training images, 3 epochs" if ctx.quick else "60,000 training images, 5 epochs")
    notes = (f"Test images are split in two halves of {half:,}: `adapt_bn` re-estimates every BN's running "
             f"statistics on the first half (images only, no labels; batches of 256), accuracy is measured on the "
             f"second half, so no image is both adapted on and scored. Pixels are in [0, 1] (no input "
             f"normalization), so inversion is `1 - x`. The 'clean' row is a control: adapting on clean test "
             f"images only replaces the EMA statistics by population statistics (see the precise-bn experiment). "
             f"Doctor: `normlab.tools.doctor` on 256 shifted images flags a train-eval-mismatch (training-mode "
             f"vs eval-mode outputs differ by more than 10%, relative L2) in {n_before} of "
             f"{len(seeds) * len(SHIFTS)} (condition, seed) pairs before adaptation and {n_after} after. Its "
             f"training-mode forward normalizes by the 256 images' own statistics, so after adaptation the "
             f"remaining difference is mostly the sampling noise of one batch against the population, which "
             f"lies close to the 10% tolerance: read the last column rather than the flag alone. A flag on "
             f"clean images means the EMA statistics themselves trail the weights.\n\n"
             "Published: Li et al. 2016 (AdaBN, 'Revisiting Batch Normalization For Practical Domain "
             "Adaptation') report that replacing the source-domain BN statistics by target-domain ones recovers "
             "much of the accuracy lost to domain shift, without labels or retraining; Schneider et al. 2020 "
             "find the same for image corruptions. Why some shifts are easy and one is not: contrast and brightness "
             "are affine maps of the pixels with a positive scale, which the first BN, once its statistics are "
             "re-estimated, undoes almost exactly (up to the zero padding of the first conv and the clipping). "
             "Inversion `1 - x` has a negative scale: the first BN's output changes sign, which no mean or "
             "variance can undo, so AdaBN cannot help there (and doctor, which compares training- and "
             "eval-mode outputs, sees consistent statistics after adaptation, not a correct model). Noise "
             "changes more than the first two moments of each channel.")
    results = {"accuracy": acc, "doctor_mismatch_findings": flags, "doctor_output_rel_diff": rel,
               "doctor_flagged_total": {"source": n_before, "adabn": n_after}, "eval_half": half}
    return _write(exp_dir, "domain-shift", "Domain shift and AdaBN (adapt_bn)",
                  f"LeNet-BN (sigmoid, batch 128, SGD lr 0.1 momentum 0.9), {train_txt}, {len(seeds)} seed(s)", table,
                  notes, [png], results, ctx, started)


# ============================================================================================ precise BN
def exp_precise_bn(ctx: Context) -> dict:
    """Moving-average (EMA) running statistics vs precise BN (``recompute_bn_stats``) over k training batches."""
    from normlab.tools import recompute_bn_stats
    started, exp_dir = time.perf_counter(), ctx.dir("precise-bn")
    size = dict(train_subset=10_000, test_subset=2000, epochs=2) if ctx.quick else dict(epochs=5)
    momenta = [0.1, 0.01, None]
    ks = [1, 10, None]  # None: every batch of the training data
    train_split = ctx.data[0].subset(size.get("train_subset"))
    x_train = train_split.float_images()
    test = ctx.data[1].subset(4000 if ctx.quick else None)
    x_test, y_test = test.float_images(), test.labels
    seeds = ctx.seed_list(full=3, quick=1)
    n_all = sum(1 for _ in _batches(x_train, 256))
    label_k = {1: "k = 1", 10: "k = 10", None: f"all ({n_all})"}
    label_m = {0.1: "0.1", 0.01: "0.01", None: "None (cumulative)"}
    acc = {label_m[m]: {"EMA": [], "batch stats": [], **{label_k[k]: [] for k in ks}} for m in momenta}
    for mom in momenta:
        name = label_m[mom]
        for seed in seeds:
            tag = f"momentum-{'none' if mom is None else mom}-s{seed}"
            model = ctx.run(exp_dir, tag, seed=seed, bn_momentum=mom, **_LENET, **size)["model"].eval()
            acc[name]["EMA"].append(evaluate(model, x_test, y_test)[0])
            acc[name]["batch stats"].append(evaluate(model, x_test, y_test, batch_size=256, batch_stats=True)[0])
            for k in ks:
                precise = recompute_bn_stats(copy.deepcopy(model), _batches(x_train, 256, seed=1000 + seed), k)
                acc[name][label_k[k]].append(evaluate(precise, x_test, y_test)[0])
            ctx.log(f"    momentum {name} seed {seed}: EMA {acc[name]['EMA'][-1]:.3f}, precise (all) "
                    f"{acc[name][label_k[None]][-1]:.3f}")
    cols = ["EMA"] + [label_k[k] for k in ks] + ["batch stats"]
    rows = [[name] + [mean_std(acc[name][c]) for c in cols] for name in acc]
    table = _table(["BN momentum", "EMA running stats"] + [f"precise BN, {label_k[k]} batches" for k in ks]
                   + ["batch stats (reference)"], rows)
    png = _bars(list(acc), {c: ([np.mean(acc[n][c]) for n in acc], [np.std(acc[n][c]) for n in acc]) for c in cols},
                exp_dir / "precise_bn.png", ylabel="test accuracy", ylim=(0, 1),
                title="LeNet-BN, lr 1.0: EMA statistics vs recompute_bn_stats over k batches of 256")
    train_txt = ("10,000 training images, 2 epochs" if ctx.quick else "60,000 training images, 5 epochs")
    notes = ("Precise BN: `recompute_bn_stats` runs k training batches of 256 (a fixed shuffle, no labels, no "
             "weight updates) through the trained network and sets each BN's running mean and variance to the "
             "population statistics of what it saw (unbiased variance). 'batch stats' normalizes each test batch "
             f"of 256 by its own statistics (model.train() on a copy). Accuracy on {len(y_test):,} test images. "
             "The BN momentum changes only the running buffers, never the training forward (which normalizes "
             "by batch statistics), so for one seed the three runs learn the very same weights: the precise-BN "
             "and batch-stats columns agree across momenta, and the EMA column isolates the cost of the moving "
             "average.\n\n"
             "Published: Ioffe & Szegedy 2015 (section 3.1) prescribe population statistics over the training "
             "data for inference, and use moving averages in practice; Wu & Johnson 2021 ('Rethinking \"Batch\" "
             "in BatchNorm') show that the EMA lags behind the changing weights (worse with a small momentum "
             "or a large learning rate) and that recomputing the statistics over a modest number of batches "
             "with the final weights ('precise BN') fixes it.")
    return _write(exp_dir, "precise-bn", "Precise BN: EMA vs recomputed population statistics",
                  f"LeNet-BN (sigmoid, batch 256, lr 1.0), {train_txt}, {len(seeds)} seed(s)", table, notes, [png],
                  acc, ctx, started)


# ============================================================================================ fold
_TIMING_ROUNDS = 10


def _paired_times(original, folded, x: torch.Tensor, repeats: int, rounds: int = _TIMING_ROUNDS) -> dict:
    """Inference ms of both models, timed in alternating rounds (``time_inference``, median of each round).

    On a shared machine the load drifts; alternating keeps both models under the same conditions, and the
    fastest round's median estimates the undisturbed time. One thread: a busy second core would otherwise
    stall every multi-threaded op on its slowest thread, which swamps what folding saves.
    """
    from normlab.tools import time_inference
    per = max(repeats // rounds, 3)
    t_orig, t_fold = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            t_orig.append(time_inference(original, x, repeats=per, warmup=2))
            t_fold.append(time_inference(folded, x, repeats=per, warmup=2))
    finally:
        torch.set_num_threads(threads)
    o, f = min(t_orig), min(t_fold)
    return {"original_ms": o, "folded_ms": f, "speedup": o / f if f > 0 else float("nan"),
            "rounds_original_ms": t_orig, "rounds_folded_ms": t_fold}


def exp_fold(ctx: Context) -> dict:
    """``fold_bn``: the folded model's outputs, accuracy and inference time (batch 256 and batch 1)."""
    from normlab.tools import fold_bn
    started, exp_dir = time.perf_counter(), ctx.dir("fold")
    test = ctx.data[1].subset(4000 if ctx.quick else None)
    x_test, y_test = test.float_images(), test.labels
    configs = [("lenet", _LENET, dict(train_subset=10_000, test_subset=2000, epochs=2) if ctx.quick
                else dict(epochs=5)),
               ("lenet-relu", _LENET_RELU, dict(train_subset=5000, test_subset=2000, epochs=1) if ctx.quick
                else dict(epochs=3))]
    repeats = {256: 30, 1: 200} if ctx.quick else {256: 100, 1: 500}
    rows, layer_rows, results = [], [], {}
    timing = {}
    for model_name, kw, size in configs:
        model = ctx.run(exp_dir, f"{model_name}-s0", seed=0, **kw, **size)["model"].eval()
        folded = fold_bn(model, x_test[:256])
        report = folded.fold_report
        with torch.no_grad():
            diff = max(float((model(xb) - folded(xb)).abs().max()) for xb in torch.split(x_test, 1000))
        acc_before, acc_after = evaluate(model, x_test, y_test)[0], evaluate(folded, x_test, y_test)[0]
        speed = {b: _paired_times(model, folded, x_test[:b], repeats[b]) for b in (256, 1)}
        timing[model_name] = speed
        n_norms = len(report.folded) + len(report.skipped)
        rows.append([model_name, f"{len(report.folded)}/{n_norms}", f"{diff:.2e}",
                     f"{acc_before:.4f} → {acc_after:.4f}"]
                    + [f"{speed[b]['original_ms']:.3f} → {speed[b]['folded_ms']:.3f} ({speed[b]['speedup']:.2f}x)"
                       for b in (256, 1)])
        kind = {name: type(m).__name__ for name, m in model.named_modules()}
        layer_rows += [[model_name, f"`{norm}` ({kind[norm]})", f"folded into `{prod}` ({kind[prod]})"]
                       for prod, norm in report.folded]
        layer_rows += [[model_name, f"`{norm}` ({kind[norm]})", f"kept: {why}"] for norm, why in report.skipped]
        results[model_name] = {"max_abs_diff_test": diff, "acc_before": acc_before, "acc_after": acc_after,
                               "folded": report.folded, "kept": report.skipped, "method": report.method,
                               **{f"b{b}": speed[b] for b in (256, 1)}}
        ctx.log(f"    {model_name}: {len(report.folded)} folded, max |diff| {diff:.2e}, speedup "
                f"{speed[256]['speedup']:.2f}x (batch 256), {speed[1]['speedup']:.2f}x (batch 1)")
    table = (_table(["model", "BN layers folded", f"max abs Δ logit ({len(y_test):,} test images)",
                     "test acc before → after", "batch 256: ms before → after (speedup)",
                     "batch 1: ms before → after (speedup)"], rows)
             + "\n\n" + _table(["model", "norm layer", "what fold_bn did"], layer_rows))
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    names = [c[0] for c in configs]
    for ax, b in zip(axes, (256, 1)):
        _bars(names, {"with BN": ([timing[n][b]["original_ms"] for n in names], None),
                      "folded": ([timing[n][b]["folded_ms"] for n in names], None)},
              exp_dir / "fold.png", ylabel="ms per forward", title=f"batch {b}", ax=ax)
    fig.suptitle("fold_bn: eval-mode inference time, one CPU thread", fontsize=10)
    png = plots._save(fig, exp_dir / "fold.png")
    notes = (f"Times (`time_inference`): eval-mode forwards on one CPU thread, the two models timed in "
             f"{_TIMING_ROUNDS} alternating rounds of {repeats[256] // _TIMING_ROUNDS} (batch 256) or "
             f"{repeats[1] // _TIMING_ROUNDS} (batch 1) forwards; "
             "each cell is the fastest round's median, since the machine may be shared (all rounds are in "
             "results.json): read the speedups as rough. "
             "Folding is exact up to float32 rounding (the arithmetic is done in float64), so accuracy is "
             "unchanged. In `lenet-relu` each BN follows a max-pool (conv → max-pool → BN): a per-channel affine "
             "map with a scale >= 0 commutes with the maximum, so `fold_bn` folds such a BN into the conv and keeps "
             "the pool; a negative scale in any channel would turn the maximum into a minimum, and that BN stays "
             "(the second table says what happened to each). At batch 1 the time is mostly per-module call "
             "overhead, so removing norm modules saves relatively more than at batch 256.\n\n"
             "Background: in evaluation a BN is a per-channel affine map, so it can be merged into the preceding "
             "convolution or linear layer (W' = W·s, b' = b·s + t), as inference toolkits do; the saving is one "
             "elementwise pass per BN layer, which matters most where the BN is a large share of the work (small "
             "models, small batches).")
    return _write(exp_dir, "fold", "Folding batch norms into the preceding layers (fold_bn)",
                  "lenet (sigmoid, lr 1.0, batch 256) and lenet-relu (lr 0.02, momentum 0.9, batch 64), seed 0, "
                  + ("quick training on a subset" if ctx.quick else "5 and 3 epochs"), table, notes, [png], results,
                  ctx, started)
