"""``CALIBRATE`` and ``REJECT_RECALL`` of ``make head``: a temperature fitted on val (the audit's
:func:`~pipeline.reports.audit.calibration.fit_temperature`, on the head's log-probabilities: for the dense
head its logits up to a constant per row, for scikit-learn heads with ``predict_proba`` their log-probabilities
scaled by 1/T and renormalised) and an unknown-image threshold on the maximum calibrated probability, chosen
on val to keep ``REJECT_RECALL`` of the known images (:func:`~pipeline.reports.audit.openset.choose_threshold`).
Both are stored in the head's record; :func:`apply` and :func:`unknown` are what predict runs."""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError
from pipeline.reports.audit import calibration, openset

METHODS = ("none", "temperature")
SCORE = "max_probability"  # the rejection score: computable by every runner and export, no train features needed


def check(method: str, recall: float) -> None:
    """A one-line error for a bad ``CALIBRATE`` or ``REJECT_RECALL``, before any fit."""
    if method not in METHODS:
        raise PipelineError(f"CALIBRATE={method}: one of {', '.join(METHODS)}")
    if not 0 <= recall < 1:
        raise PipelineError(f"REJECT_RECALL={recall:g}: a share of known val images in [0, 1) (0 = no threshold)")


def apply(probs, temperature) -> np.ndarray:
    """Probabilities ``probs`` (N, n_classes) scaled by ``temperature`` (None or 1: as they are)."""
    p = np.asarray(probs, np.float64)
    if temperature is None or temperature == 1:
        return p
    return calibration.scaled(np.log(np.clip(p, 1e-300, None)), float(temperature))


def unknown(probs, threshold) -> np.ndarray:
    """Which rows (calibrated probabilities) are unknown images: their maximum probability below ``threshold``."""
    return openset.rejected(np.asarray(probs).max(axis=1), threshold)


def _figures(p, y) -> dict:
    return {"nll": calibration.nll(p, y), "ece": calibration.ece(p, y)}


def fit(val_probs, val_y, test_probs, test_y, method="temperature", recall=0.95) -> dict:
    """The record's fields: ``temperature`` (with ``method=temperature``), ``reject_threshold`` and
    ``reject_score`` (with ``recall`` > 0), and ``calibration``: val/test NLL and ECE before and after, the
    share of val/test images rejected. ``*_y``: column indices of the true classes."""
    val_probs, test_probs = np.asarray(val_probs, np.float64), np.asarray(test_probs, np.float64)
    out, figures = {}, {"fitted_on": "val"}
    if method == "temperature":
        t = calibration.fit_temperature(np.log(np.clip(val_probs, 1e-300, None)), val_y)
        out["temperature"] = t
        for name, p, y in (("val", val_probs, val_y), ("test", test_probs, test_y)):
            figures[name] = {"before": _figures(p, y), "after": _figures(apply(p, t), y)}
    if recall > 0:
        val_cal = apply(val_probs, out.get("temperature"))
        threshold = openset.choose_threshold(val_cal.max(axis=1), recall)
        out.update(reject_threshold=threshold, reject_score=SCORE)
        figures["reject"] = {"recall": recall, "val_rejected": float(unknown(val_cal, threshold).mean()),
                             "test_rejected": float(unknown(apply(test_probs, out.get("temperature")),
                                                            threshold).mean())}
    return {**out, "calibration": figures} if out else {}


def describe(fields: dict) -> list[str]:
    """The lines ``make head`` prints about what :func:`fit` found."""
    lines, c = [], fields.get("calibration") or {}
    if "temperature" in fields:
        v, t = c["val"], c["test"]
        lines.append(f"temperature {fields['temperature']:.3f} (fitted on val): val NLL {v['before']['nll']:.4f} -> "
                     f"{v['after']['nll']:.4f}, ECE {v['before']['ece']:.4f} -> {v['after']['ece']:.4f}; test NLL "
                     f"{t['before']['nll']:.4f} -> {t['after']['nll']:.4f}, ECE {t['before']['ece']:.4f} -> "
                     f"{t['after']['ece']:.4f}")
    if "reject_threshold" in fields:
        r = c["reject"]
        lines.append(f"unknown images: {SCORE.replace('_', ' ')} below {fields['reject_threshold']:.4f} (val recall "
                     f"{r['recall']:g}); val {r['val_rejected']:.1%}, test {r['test_rejected']:.1%} rejected")
    return lines
