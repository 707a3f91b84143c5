"""Error analysis a person can look at: every misclassified test image in ``errors.csv`` (path, true class,
predicted class, its probability, the top k), and ``errors.png``, a contact sheet of the most confidently
wrong test photos with their true and predicted labels. Duplicates and leaks between splits are the audit's
(:mod:`pipeline.reports.audit.leaks`)."""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

from pipeline import records
from pipeline.data import images
from pipeline.reports import figures

SHEET = 16  # photos on the contact sheet
THUMB = 160  # their side in pixels
LABEL = 36  # pixels above each for its two label lines
TITLE = 40  # pixels above the grid for the title
CELL_W, CELL_H = THUMB + 8, THUMB + LABEL
DPI = 100  # one figure pixel per image pixel


def misclassified(labels, scores, class_names, paths, k=3) -> list[dict]:
    """One row per wrong prediction, the most confident first: path, true, predicted, its score, top k."""
    pred = np.argmax(scores, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = [{"path": str(paths[i]), "true": class_names[labels[i]], "predicted": class_names[pred[i]],
             "probability": float(scores[i, pred[i]]),
             "top": [(class_names[j], float(scores[i, j])) for j in order[i]]}
            for i in np.flatnonzero(pred != labels)]
    return sorted(rows, key=lambda r: -r["probability"])


def write_csv(path, rows, k=3) -> None:
    with records.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "true", "predicted", "probability",
                        *[f"{x}_{i}" for i in range(1, k + 1) for x in ("top", "p")]])
            for r in rows:
                w.writerow([r["path"], r["true"], r["predicted"], f"{r['probability']:.6f}",
                            *[v for c, p in r["top"] for v in (c, f"{p:.6f}")]])


def plot_sheet(path, rows, root, title="") -> bool:
    """The contact sheet of the first ``SHEET`` rows whose photo can be read under ``root``, drawn by
    :func:`draw_sheet`; False when none can (an in-memory source, or files moved away)."""

    shown = []
    for r in rows:
        if len(shown) == SHEET or not root:
            break
        try:
            shown.append((r, images.load_resized(os.path.join(root, r["path"]), THUMB)))
        except images.BadImage:
            continue
    if shown:
        draw_sheet(path, shown, title)
    return bool(shown)


def draw_sheet(path, shown, title="") -> None:
    """``shown``: [(row, thumbnail pixels)]. matplotlib draws the labels and the title; the thumbnails are then
    copied into its pixels unchanged (no image resampling), and the sheet written as a PNG, atomically."""
    cols = min(4, len(shown))
    h, w = TITLE + -(-len(shown) // cols) * CELL_H, cols * CELL_W
    fig = figures.figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    for k, (r, _) in enumerate(shown):
        y, x = thumb_origin(k, cols)
        fig.text((x + THUMB / 2) / w, 1 - (y - 4) / h,
                 f"true {r['true']}\npredicted {r['predicted']} {r['probability']:.2f}",
                 ha="center", va="bottom", fontsize=6.5, color="firebrick")
    fig.suptitle(title or "most confidently wrong test images", y=1 - 8 / h, va="top", fontsize=10)
    fig.canvas.draw()
    sheet = np.asarray(fig.canvas.buffer_rgba())[:h, :w, :3].copy()
    for k, (_, pixels) in enumerate(shown):
        y, x = thumb_origin(k, cols)
        sheet[y:y + THUMB, x:x + THUMB] = pixels
    with records.atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(sheet).save(tmp, format="png", compress_level=figures.PNG_LEVEL)


def thumb_origin(k, cols) -> tuple[int, int]:
    """Top-left pixel (row, column) of the ``k``-th thumbnail on a contact sheet ``cols`` wide."""
    return TITLE + (k // cols) * CELL_H + LABEL, (k % cols) * CELL_W + 4
