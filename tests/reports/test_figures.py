"""The reports' figures as written to disk: the confusion matrix shades each cell by its count and labels it, the
curves plot every series of the history, a figure that cannot be written raises, and none imports pyplot."""

import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from pipeline.reports import figures

ROOT = Path(__file__).resolve().parents[2]
M = {"class_names": ["daisy", "dandelion", "rose", "sunflower", "tulip"], "accuracy": 0.84,
     "confusion_matrix": [[5, 1, 0, 0, 0], [2, 7, 1, 0, 0], [0, 0, 9, 0, 1], [0, 0, 0, 8, 0], [0, 1, 0, 0, 12]]}


def _png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def test_confusion_png_shades_each_cell_by_its_count_and_labels_it(tmp_path):
    fig = figures.confusion_figure(M, "logreg: test accuracy 0.840")
    figures.save(fig, str(tmp_path / "confusion.png"))
    png = _png(tmp_path / "confusion.png")
    assert png.shape[:2] == (round(fig.get_figheight() * fig.dpi), round(fig.get_figwidth() * fig.dpi))
    ax, = fig.axes
    cm = np.asarray(M["confusion_matrix"])
    blues = matplotlib.colormaps["Blues"]
    for (i, j), count in np.ndenumerate(cm):  # a pixel of each cell, beside its label: the count's colour
        x, y = ax.transData.transform((j - 0.35, i - 0.35))
        want = np.round(np.asarray(blues((count - cm.min()) / (cm.max() - cm.min()))[:3]) * 255)
        assert np.abs(png[png.shape[0] - int(y) - 1, int(x)] - want).max() <= 2, (i, j, count)
    assert [t.get_text() for t in ax.texts] == [str(c) for c in cm.ravel()]
    assert [t.get_text() for t in ax.get_xticklabels()] == M["class_names"]
    assert [t.get_text() for t in ax.get_yticklabels()] == M["class_names"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("Predicted label", "True label",
                                                                  "logreg: test accuracy 0.840")
    assert figures.confusion_figure(M).axes[0].get_title() == "accuracy 0.840"


def test_curves_png_plots_every_series_and_the_second_phase(tmp_path):
    history = {"loss": [1.0, .6, .5, .4], "accuracy": [.4, .7, .8, .85], "val_loss": [1.1, .8, .9, .7],
               "val_accuracy": [.3, .6, .6, .7]}
    fig = figures.curves_figure(history, "dense", phase_start=2)
    figures.save(fig, str(tmp_path / "curves.png"))
    assert _png(tmp_path / "curves.png").shape[:2] == (400, 1000)
    for ax, metric in zip(fig.axes, ("loss", "accuracy")):
        series = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        assert series["train"] == history[metric] and series["val"] == history[f"val_{metric}"]
        phase, = [line for line in ax.get_lines() if line.get_label() == "fine-tuning starts"]
        assert list(phase.get_xdata()) == [2.5, 2.5]  # between epochs 2 and 3
        assert ax.get_ylabel() == metric
    assert fig.get_suptitle() == "dense"
    assert [line.get_label() for line in figures.curves_figure(history).axes[0].get_lines()] == ["train", "val"]


def test_a_figure_that_cannot_be_written_raises_and_leaves_nothing(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        figures.plot_confusion(str(tmp_path / "file" / "confusion.png"), M)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_no_figure_imports_pyplot():
    """Drawn on the Agg canvas of each figure: no pyplot, so no global figure state and no GUI backend."""
    code = """
import sys, tempfile, os
import numpy as np
from pipeline.reports import errors, figures
m = {"class_names": ["a", "b"], "confusion_matrix": [[3, 1], [0, 4]], "accuracy": 0.875}
with tempfile.TemporaryDirectory() as d:
    figures.plot_confusion(os.path.join(d, "c.png"), m)
    figures.plot_curves(os.path.join(d, "k.png"), {"loss": [1.0, 0.5]})
    row = {"true": "a", "predicted": "b", "probability": 0.9}
    errors.draw_sheet(os.path.join(d, "e.png"), [(row, np.zeros((errors.THUMB, errors.THUMB, 3), np.uint8))])
print("matplotlib.pyplot" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False"]
