"""Unknown-image rejection: per-image scores of how known an image looks (the maximum calibrated
probability; the mean cosine similarity to its nearest train images; that similarity relative to those train
images' own similarity to their nearest train images, a local-density correction as in the local outlier
factor; the relative Mahalanobis distance, the nearest class Gaussian's against one Gaussian of all train
images), combined into one by standardising each on the known val images and weighting them (``WEIGHTS``); a
threshold chosen on val to keep a target share of known images. Pure functions."""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

from pipeline.reports.audit import knn

# of the standardised scores in :func:`combined` (train_similarity is reported, and inside relative_similarity)
WEIGHTS = {"max_probability": 0.25, "relative_similarity": 0.5, "relative_mahalanobis": 0.25}
SCORES = tuple(WEIGHTS)
GAUSSIAN_COMPONENTS = 128  # principal components of the unit-length features the Gaussians live on


def fit_gaussians(train_features, train_labels, components=GAUSSIAN_COMPONENTS) -> dict:
    """The Gaussians :func:`relative_mahalanobis` measures against, on the first ``components`` principal
    components of the unit-length train features: one per class sharing a Ledoit-Wolf covariance, and one of
    all train images (the background)."""
    z = knn.unit(train_features).astype(np.float64)
    pca = PCA(max(1, min(components, z.shape[1], len(z) - 1)), random_state=0).fit(z)
    z = pca.transform(z)
    _, of = np.unique(train_labels, return_inverse=True)
    means = np.stack([z[of == c].mean(axis=0) for c in range(of.max() + 1)])
    shared, background = LedoitWolf(assume_centered=True).fit(z - means[of]), LedoitWolf().fit(z)
    return {"pca": pca, "means": means, "precision": shared.precision_,
            "background": (background.location_, background.precision_)}


def relative_mahalanobis(gaussians, features) -> np.ndarray:
    """Minus the smallest relative Mahalanobis distance of each row (higher = more known): the squared distance
    to a class Gaussian less the distance to the background Gaussian (Ren et al., 2021), which cancels what
    every image shares and keeps what tells the classes apart."""
    z = gaussians["pca"].transform(knn.unit(features).astype(np.float64))
    (mu, bg) = gaussians["background"]
    d0 = np.einsum("ij,jk,ik->i", z - mu, bg, z - mu)
    d = [np.einsum("ij,jk,ik->i", z - m, gaussians["precision"], z - m) for m in gaussians["means"]]
    return -(np.min(d, axis=0) - d0)


def train_density(train_features, k=10) -> np.ndarray:
    """Each train row's mean cosine similarity to its ``k`` nearest other train rows: how tight its neighbourhood
    is, what :func:`raw_scores` compares a query's similarity with."""
    sims = knn.nearest(train_features, train_features, k, same=True)[0].astype(np.float64)
    return sims.mean(axis=1) if sims.shape[1] else np.zeros(len(sims))


def raw_scores(probs, features, train_features, gaussians, k=10, density=None) -> dict:
    """{"max_probability", "train_similarity", "relative_similarity", "relative_mahalanobis"} of each row (higher
    = more like the known classes). ``gaussians``: :func:`fit_gaussians` of the train rows; ``density``:
    :func:`train_density` of ``train_features`` with the same ``k`` (computed when None)."""
    density = train_density(train_features, k) if density is None else np.asarray(density, np.float64)
    sims, idx = knn.nearest(features, train_features, k)
    similarity = sims.astype(np.float64).mean(axis=1)
    return {"max_probability": np.asarray(probs).max(axis=1), "train_similarity": similarity,
            "relative_similarity": similarity - density[idx].mean(axis=1),
            "relative_mahalanobis": relative_mahalanobis(gaussians, features)}


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
