"""Outliers: images far from every other image in feature space: the mean cosine distance to their ``k``
nearest neighbours among all the cache's images (train, val and test together), largest first."""

from __future__ import annotations

import numpy as np

from pipeline.reports.audit import Skipped, knn


def scores(features, k=10) -> np.ndarray:
    """Each row's mean cosine distance to its ``k`` nearest other rows."""
    if len(features) < 2:
        raise Skipped("needs at least two images")
    sims, _ = knn.nearest(features, features, k, same=True)
    return 1 - sims.astype(np.float64).mean(axis=1)


def rank(features, labels, paths, splits, names, k=10) -> list[dict]:
    """Every row with its outlier score, the farthest first: path, split, label, score."""
    s = scores(features, k)
    order = np.argsort(-s, kind="stable")
    return [{"path": str(paths[i]), "split": str(splits[i]), "label": names[labels[i]], "score": float(s[i])}
            for i in order]
