"""The reports' figures, drawn in this process with matplotlib's object API on the Agg canvas (no pyplot: no
global state, no backend to choose, nothing to close) and written as PNGs atomically."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline import records

DPI = 100
PNG_LEVEL = 1  # zlib's fastest: photos and flat plots barely compress further, and encoding is a figure's cost


def figure(**kw) -> Figure:
    """A matplotlib Figure on its own Agg canvas (``fig.canvas``); ``kw`` as for Figure."""
    fig = Figure(**{"dpi": DPI, **kw})
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str) -> None:
    """``fig`` as a PNG at ``path``, atomically, one figure pixel per PNG pixel."""
    with records.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, pil_kwargs={"compress_level": PNG_LEVEL})


def confusion_figure(m: dict, title: str = "") -> Figure:
    """The confusion matrix of metrics ``m``: rows the true class, columns the predicted one, each cell
    shaded by its count on a blue scale and labelled with it."""
    cm, names = np.asarray(m["confusion_matrix"]), m["class_names"]
    n = len(names)
    fig = figure(figsize=(max(4, 0.8 * n + 2), max(3.5, 0.8 * n + 1.5)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(cm, interpolation="nearest", cmap="Blues")
    middle = (cm.max() + cm.min()) / 2
    for (i, j), count in np.ndenumerate(cm):  # light text on dark cells, dark on light ones
        ax.text(j, i, str(count), ha="center", va="center", color=image.cmap(0.0 if count >= middle else 1.0))
    ax.set(xticks=np.arange(n), yticks=np.arange(n), xticklabels=names, yticklabels=names,
           xlabel="Predicted label", ylabel="True label", title=title or f"accuracy {m['accuracy']:.3f}")
    if n > 4:
        ax.tick_params(axis="x", labelrotation=45)
    return fig


def curves_figure(history: dict, title: str = "", phase_start: int | None = None) -> Figure:
    """Loss and accuracy per epoch, train and val, side by side (a Keras ``History.history`` dict); with
    ``phase_start`` (epochs before the second phase) a dashed line where the second phase starts."""
    fig = figure(figsize=(10, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for key, label in ((metric, "train"), (f"val_{metric}", "val")):
            if key in history:
                ax.plot(range(1, len(history[key]) + 1), history[key], label=label)
        if phase_start:
            ax.axvline(phase_start + 0.5, color="gray", linestyle="--", label="fine-tuning starts")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel=metric)
        if ax.get_legend_handles_labels()[0]:  # a history without this metric draws an empty panel
            ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_confusion(path: str, m: dict, title: str = "") -> None:
    """:func:`confusion_figure` as a PNG at ``path``."""
    save(confusion_figure(m, title), path)


def plot_curves(path: str, history: dict, title: str = "", phase_start: int | None = None) -> None:
    """:func:`curves_figure` as a PNG at ``path``."""
    save(curves_figure(history, title, phase_start), path)
