"""Calibration: expected calibration error, reliability bins, negative log-likelihood, and temperature
scaling (one parameter, fitted on val by minimising the NLL over log T). Pure functions of arrays."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

BINS = 15


def as_logits(logits_or_probs) -> np.ndarray:
    """Logits as given, or the log of probabilities (rows >= 0 summing to 1): softmax(log p / T) is the
    temperature-scaled distribution either way."""
    z = np.asarray(logits_or_probs, np.float64)
    if z.min() >= 0 and np.allclose(z.sum(axis=1), 1, atol=1e-4):
        return np.log(np.clip(z, 1e-300, None))
    return z


def scaled(logits_or_probs, temperature: float) -> np.ndarray:
    """Probabilities after dividing the logits by ``temperature``."""
    return np.exp(log_softmax(as_logits(logits_or_probs) / temperature, axis=1))


def nll(probs, y) -> float:
    """Mean negative log-likelihood of the labels ``y``."""
    p = np.asarray(probs, np.float64)[np.arange(len(y)), y]
    return float(-np.log(np.clip(p, 1e-15, None)).mean())


def fit_temperature(logits_or_probs, y) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on (``logits_or_probs``, ``y``)."""
    z, y = as_logits(logits_or_probs), np.asarray(y)

    def loss(log_t):
        return -log_softmax(z / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean()

    best = minimize_scalar(loss, bounds=(-5.0, 5.0), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(best.x))


def reliability(probs, y, bins=BINS) -> list[dict]:
    """Equal-width confidence bins: {"lo", "hi", "n", "confidence" (mean), "accuracy"} of each non-empty bin."""
    p = np.asarray(probs)
    conf, right = p.max(axis=1), p.argmax(axis=1) == np.asarray(y)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int((which == b).sum()),
             "confidence": float(conf[which == b].mean()), "accuracy": float(right[which == b].mean())}
            for b in range(bins) if (which == b).any()]


def ece(probs, y, bins=BINS) -> float:
    """Expected calibration error: the bins' |accuracy - confidence| weighted by their share of the rows."""
    rows = reliability(probs, y, bins)
    n = sum(r["n"] for r in rows)
    return float(sum(r["n"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / n) if n else 0.0
