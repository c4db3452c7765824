"""Plots for runs and experiments (matplotlib, Agg backend: files only, no display needed).

Figures are small (about 6x4 inches at 80 dpi) so that the PNGs committed under ``docs/`` stay well below 300 KB.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

DPI = 80


def _save(fig, path: str | Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return str(path)


def plot_run(metrics: Sequence[dict], path: str | Path, title: str = "") -> str:
    """d2l-style curves of one run: train loss, train acc, test acc (and test acc with batch statistics)."""
    epochs = [m["epoch"] for m in metrics]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [m["train_loss"] for m in metrics], label="train loss")
    ax.plot(epochs, [m["train_acc"] for m in metrics], "--", label="train acc")
    ax.plot(epochs, [m["test_acc"] for m in metrics], "-.", label="test acc")
    ax.plot(epochs, [m["test_acc_batch_stats"] for m in metrics], ":", label="test acc (batch stats)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves_grid(groups: dict[str, list[list[dict]]], path: str | Path, title: str = "") -> str:
    """One panel per group (e.g. "BN", "no BN"), d2l-style curves, mean over seeds with a band of +-1 std."""
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (name, runs) in zip(axes[0], groups.items()):
        epochs = [m["epoch"] for m in runs[0]]
        for key, style, label in [("train_loss", "-", "train loss"), ("train_acc", "--", "train acc"),
                                  ("test_acc", "-.", "test acc")]:
            values = np.array([[m[key] for m in run] for run in runs])
            mean, std = values.mean(0), values.std(0)
            ax.plot(epochs, mean, style, label=label)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.set_title(f"{name} ({len(runs)} seeds)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_lines(series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
               path: str | Path, *, xlabel: str, ylabel: str, title: str = "", logx: bool = False,
               ylim: tuple[float, float] | None = None) -> str:
    """Lines ``label -> (x, mean, std or None)``, with a +-std band where given."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, (x, y, std) in series.items():
        x, y = np.asarray(x, float), np.asarray(y, float)
        ax.plot(x, y, marker="o", ms=3, label=label)
        if std is not None:
            std = np.asarray(std, float)
            ax.fill_between(x, y - std, y + std, alpha=0.2)
    if logx:
        ax.set_xscale("log", base=2 if all(float(v).is_integer() for s in series.values() for v in s[0]) else 10)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_percentiles(panels: dict[str, tuple[Sequence[float], np.ndarray]], path: str | Path,
                     title: str = "") -> str:
    """Panels ``label -> (steps, (T, 3) array of 15th/50th/85th percentiles)``, as in the BN paper's Fig. 1(b, c)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False, sharey=True)
    for ax, (label, (steps, pct)) in zip(axes[0], panels.items()):
        pct = np.asarray(pct)
        for column, name in enumerate(["15th", "50th", "85th"]):
            ax.plot(steps, pct[:, column], label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("sigmoid input")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_histograms(panels: dict[str, dict[str, np.ndarray]], path: str | Path, title: str = "") -> str:
    """One row per quantity (gamma, beta), one column per layer: histograms of learned values."""
    rows = list(panels)
    layers = list(panels[rows[0]])
    fig, axes = plt.subplots(len(rows), len(layers), figsize=(2.6 * len(layers), 2.2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            ax.hist(np.asarray(panels[row][layer]).ravel(), bins=20, color=f"C{r}")
            ax.set_title(f"{row} {layer}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
