"""Evaluation of a fitted head: a metrics dict (scikit-learn's metrics), a printed table, JSON and the PNGs of
:mod:`pipeline.reports.figures`."""

from __future__ import annotations

import os

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                             precision_recall_fscore_support, top_k_accuracy_score)

from pipeline import records
from pipeline.reports import figures


def top_k(n_classes: int) -> int | None:
    """The k of top-k accuracy: min(3, n_classes - 1) when there are more than two classes, else None."""
    return min(3, n_classes - 1) if n_classes > 2 else None


def metrics(y_true, y_pred, class_names, scores=None) -> dict:
    """Accuracy, balanced accuracy, per-class precision/recall/F1/support, macro and weighted averages,
    top-k accuracy (more than two classes and ``scores`` (N, n_classes) given) and the confusion matrix
    (rows: true class, columns: predicted), all over every class of ``class_names``."""

    labels = list(range(len(class_names)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    # precision_recall_fscore_support is what classification_report prints; used directly so that a class
    # named "accuracy" or "macro avg" cannot collide with the report's summary rows
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1-score": float(f[i]),
                     "support": int(s[i])} for i, c in enumerate(class_names)}

    def avg(kind):
        a = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=kind, zero_division=0)
        return {"precision": float(a[0]), "recall": float(a[1]), "f1-score": float(a[2])}

    out = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "per_class": per_class,
        "macro_avg": avg("macro"),
        "weighted_avg": avg("weighted"),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }
    k = top_k(len(class_names))
    if k and scores is not None:
        out[f"top_{k}_accuracy"] = float(top_k_accuracy_score(y_true, scores, k=k, labels=labels))
    return out


def table(m: dict, title: str = "") -> str:
    """Per-class precision/recall/F1/support, the summary figures and the confusion matrix, as text."""
    names = m["class_names"]
    w = max(12, *(len(c) + 2 for c in names))
    lines = [title] if title else []
    lines.append(f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for c in names:
        r = m["per_class"][c]
        lines.append(f"{c:<{w}}{r['precision']:>10.3f}{r['recall']:>10.3f}{r['f1-score']:>10.3f}"
                     f"{r['support']:>9d}")
    for avg in ("macro_avg", "weighted_avg"):
        r = m[avg]
        lines.append(f"{avg.replace('_', ' '):<{w}}{r['precision']:>10.3f}{r['recall']:>10.3f}"
                     f"{r['f1-score']:>10.3f}{m['n']:>9d}")
    summary = [f"accuracy {m['accuracy']:.4f}", f"balanced accuracy {m['balanced_accuracy']:.4f}"]
    summary += [f"{k.replace('_', '-', 1).replace('_', ' ')} {v:.4f}" for k, v in m.items()
                if k.startswith("top_")]
    lines += ["", "  ".join(summary), "", "confusion matrix (rows: true, columns: predicted)"]
    cw = max(6, *(len(c) + 1 for c in names))
    lines.append(" " * w + "".join(f"{c[:cw - 1]:>{cw}}" for c in names))
    for c, row in zip(names, m["confusion_matrix"]):
        lines.append(f"{c:<{w}}" + "".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)


def write_json(path: str, m: dict) -> None:
    records.write_json(path, m)


def write_reports(out: str, metrics: dict, title: str, history: dict | None = None, curves: dict | None = None,
                  curves_title: str = "", phase_start: int | None = None) -> dict:
    """``out``/metrics.json and confusion.png of ``metrics["test"]``; with ``history`` also history.json and
    curves.png of ``curves`` (default: ``history``), split at ``phase_start``. Returns the paths written."""
    paths = {"metrics": os.path.join(out, "metrics.json"), "confusion": os.path.join(out, "confusion.png")}
    write_json(paths["metrics"], metrics)
    figures.plot_confusion(paths["confusion"], metrics["test"], f"{title}: test accuracy {metrics['test']['accuracy']:.3f}")
    if history:
        paths["history"], paths["curves"] = os.path.join(out, "history.json"), os.path.join(out, "curves.png")
        write_json(paths["history"], history)
        figures.plot_curves(paths["curves"], curves or history, curves_title or title, phase_start)
    return paths
