"""Unknown-image rejection: per-image scores of how known an image looks (the maximum calibrated
probability; the mean cosine similarity to its nearest train images; that similarity relative to those train
images' own similarity to their nearest train images, a local-density correction as in the local outlier
factor), combined into one by standardising each on the known val images and weighting them (``WEIGHTS``: the
neighbours 3 to 1); a threshold chosen on val to keep a target share of known images. Pure functions."""

from __future__ import annotations

import numpy as np

from pipeline.reports.audit import knn

SCORES = ("max_probability", "train_similarity", "relative_similarity")
# of the standardised scores in :func:`combined`
WEIGHTS = {"max_probability": 0.25, "train_similarity": 0.375, "relative_similarity": 0.375}


def train_density(train_features, k=10) -> np.ndarray:
    """Each train row's mean cosine similarity to its ``k`` nearest other train rows: how tight its neighbourhood
    is, what :func:`raw_scores` compares a query's similarity with."""
    sims = knn.nearest(train_features, train_features, k, same=True)[0].astype(np.float64)
    return sims.mean(axis=1) if sims.shape[1] else np.zeros(len(sims))


def raw_scores(probs, features, train_features, k=10, density=None) -> dict:
    """{"max_probability", "train_similarity", "relative_similarity"} of each row (higher = more like the known
    classes). ``density``: :func:`train_density` of ``train_features`` with the same ``k`` (computed when None)."""
    density = train_density(train_features, k) if density is None else np.asarray(density, np.float64)
    sims, idx = knn.nearest(features, train_features, k)
    similarity = sims.astype(np.float64).mean(axis=1)
    return {"max_probability": np.asarray(probs).max(axis=1), "train_similarity": similarity,
            "relative_similarity": similarity - density[idx].mean(axis=1)}


def standardiser(val_scores: dict) -> dict:
    """{score name: (mean, std)} on the known val images: what :func:`combined` needs to score any image."""
    return {n: (float(np.mean(val_scores[n])), float(np.std(val_scores[n]) or 1.0)) for n in SCORES}


def combined(scores: dict, stats: dict) -> np.ndarray:
    """The default score: the ``WEIGHTS``-weighted sum of the scores, each standardised with ``stats``
    (:func:`standardiser`)."""
    return sum(WEIGHTS[n] * (np.asarray(scores[n], np.float64) - stats[n][0]) / stats[n][1] for n in SCORES)


def choose_threshold(scores, recall=0.95) -> float:
    """The largest threshold t such that at least ``recall`` of ``scores`` (known images) are >= t."""
    s = np.sort(np.asarray(scores, np.float64))
    if not len(s):
        raise ValueError("no scores to choose a threshold on")
    return float(s[min(int(np.floor((1 - recall) * len(s) + 1e-9)), len(s) - 1)])


def rejected(scores, threshold: float) -> np.ndarray:
    """The rows an image classifier would label "unknown": score below the threshold."""
    return np.asarray(scores) < threshold
