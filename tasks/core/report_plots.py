"""The plots of `kpod report`: plain data in, PNG bytes out (matplotlib's Agg backend, no display).

Each function draws one figure and returns its PNG, so the page builder (`report_html`) can embed
it as base64 and a test can decode it. Colours follow one fixed order of labels, so a method has
the same colour in every plot of a page when the caller passes the same `order`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

SPLITS = ("val", "test")
WIDTH, HEIGHT = 7.0, 3.6  # inches; at DPI this is a figure that reads well in a 60em column
DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: pages are written by CLIs and flow workers
    import matplotlib.pyplot as plt

    return plt


def _colour(order: Sequence[str], label: str) -> Any:
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    index = list(order).index(label) if label in order else len(order)
    return cycle[index % len(cycle)]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def accuracy_png(points: Sequence[Mapping[str, Any]], order: Sequence[str]) -> bytes:
    """Accuracy per label (a method), one panel per split: a bar at the mean over seeds and each
    seed as a dot with its 95% (Wilson) interval. points: dicts with label, seed, split,
    accuracy, ci_low, ci_high (accuracy None: a failed run, not drawn)."""
    plt = _pyplot()
    splits = [s for s in SPLITS if any(p["split"] == s for p in points)]
    fig, axes = plt.subplots(1, len(splits), figsize=(WIDTH, HEIGHT), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits):
        for x, label in enumerate(order):
            mine = [p for p in points if p["split"] == split and p["label"] == label and p["accuracy"] is not None]
            if not mine:
                continue
            colour = _colour(order, label)
            ax.bar(x, sum(p["accuracy"] for p in mine) / len(mine), width=0.6, color=colour, alpha=0.25)
            # seeds side by side inside the bar, so equal accuracies do not hide each other
            offsets = [0.0] if len(mine) == 1 else [-0.2 + 0.4 * i / (len(mine) - 1) for i in range(len(mine))]
            for dx, p in zip(offsets, sorted(mine, key=lambda p: p["seed"])):
                err = [[p["accuracy"] - p["ci_low"]], [p["ci_high"] - p["accuracy"]]]
                ax.errorbar(x + dx, p["accuracy"], yerr=err, fmt="o", color=colour, capsize=3, ms=5)
        ax.set_xticks(range(len(order)), list(order), rotation=20, ha="right")
        ax.set_title(f"{split} accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("accuracy (bar: mean; dot: a seed, 95% CI)")
    fig.tight_layout()
    return _png(fig)


def lines_png(
    series: Mapping[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str, order: Sequence[str] = (),
    ylim: tuple[float, float] | None = None, markers: bool = True,
) -> bytes:
    """One line per label of `series` ({label: [(x, y), ...]}), in `order` then the rest."""
    plt = _pyplot()
    labels = [k for k in order if k in series] + [k for k in series if k not in order]
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    for label in labels:
        pts = sorted(series[label])
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o" if markers else None, ms=4,
                lw=1.5, label=label, color=_colour(labels, label))
    if all(float(x).is_integer() for pts in series.values() for x, _ in pts):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, steps, stages: no 1.5
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if len(labels) > 1 or (labels and labels[0]):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def stacked_bars_png(counts: Mapping[int, Mapping[int, int]], xlabel: str, ylabel: str, legend: str) -> bytes:
    """Bars per x ({x: {part: count}}), each stacked by part (say the input steps a curriculum
    stage shows): what share of the bar each part takes."""
    plt = _pyplot()
    xs = sorted(counts)
    parts = sorted({p for c in counts.values() for p in c})
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    bottom = [0] * len(xs)
    for part in parts:
        heights = [counts[x].get(part, 0) for x in xs]
        ax.bar([str(x) for x in xs], heights, bottom=bottom, label=f"{legend} {part}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
