"""The audit's figures, as matplotlib Figures on the Agg canvas (no pyplot), for :mod:`pipeline.reports.html`."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def balance(per_split: dict, names) -> Figure:
    """Images per class, one bar per split side by side."""
    fig = Figure(figsize=(max(5, 0.7 * len(names) + 3), 3.2), dpi=100)
    ax = fig.subplots()
    x, width = np.arange(len(names)), 0.8 / max(len(per_split), 1)
    for j, (s, counts) in enumerate(per_split.items()):
        ax.bar(x + j * width, counts, width, label=s)
    ax.set_xticks(x + width * (len(per_split) - 1) / 2, names, rotation=45 if len(names) > 6 else 0)
    ax.set_ylabel("images")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def reliability(curves: dict, title: str) -> Figure:
    """Accuracy against confidence per bin, one line per curve ({label: reliability rows}), and the diagonal."""
    fig = Figure(figsize=(4.6, 4.2), dpi=100)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfectly calibrated")
    for label, rows in curves.items():
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def histograms(series: dict, threshold: float | None, xlabel: str) -> Figure:
    """Overlaid histograms of ``series`` ({label: values}) with a vertical line at ``threshold``."""
    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.subplots()
    values = [np.asarray(v) for v in series.values() if len(v)]
    if values:
        edges = np.histogram_bin_edges(np.concatenate(values), bins=30)
        for label, v in series.items():
            if len(v):
                ax.hist(v, bins=edges, alpha=0.5, label=label)
    if threshold is not None:
        ax.axvline(threshold, color="firebrick", label=f"threshold {threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
