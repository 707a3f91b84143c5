"""Label issues: out-of-fold probabilities on the cached features (train+val), cleanlab's label quality score
(``get_label_quality_scores``, lowest = most suspect), and flags: the lowest-quality images, as many as
confident learning estimates the data holds (``num_label_issues`` from the calibrated confident joint). The
probabilities blend three models of the data, each blind to the labels it predicts: a strongly regularised
logistic regression (standardised features, ``OOF_C``) and a shrinkage linear discriminant analysis (on the
first ``LDA_COMPONENTS`` principal components), both cross-validated in stratified folds (seeded), and a
leave-one-out cosine k-nearest-neighbour vote (``KNN_K`` neighbours weighted by exp(similarity /
``KNN_TEMPERATURE``)); the mean is calibrated by one temperature fitted on the given labels (the count reads
the numbers as probabilities)."""

from __future__ import annotations

import math
import warnings

import numpy as np
from cleanlab.count import num_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.reports.audit import Skipped, calibration, knn

COLUMNS = ("path", "split", "given", "suggested", "quality", "p_given", "p_suggested")
OOF_C = 1e-3  # the out-of-fold logistic regression's inverse regularisation
KNN_K, KNN_TEMPERATURE, KNN_SMOOTHING = 20, 0.1, 1e-3
LDA_COMPONENTS = 128  # principal components the discriminant analysis sees (fewer when the data has fewer)


def logistic(seed=0, C=1.0):
    """The audit's linear head: standardised features, multinomial logistic regression."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))


def check_folds(y, n_classes, folds, names) -> None:
    """Skipped (with why) when the labels cannot be cross-validated in ``folds`` stratified folds."""
    counts = np.bincount(y, minlength=n_classes)
    if (counts > 0).sum() < 2:
        raise Skipped("needs at least two classes in train+val; this cache has "
                      f"{(counts > 0).sum()}")
    if folds < 2:
        raise Skipped(f"FOLDS={folds}: needs at least 2 folds")
    few = [f"{names[c]} ({counts[c]})" for c in range(n_classes) if 0 < counts[c] < folds]
    if few:
        raise Skipped(f"class {', '.join(few)} has fewer train+val images than FOLDS={folds}; add images "
                      "or lower FOLDS")


def cross_validated(model, X, y, folds=5, seed=0) -> np.ndarray:
    """Out-of-fold probabilities of the estimator ``model`` (N, classes present, in label order; labels
    0..K-1): each of ``folds`` stratified folds (shuffled with ``seed``) predicted by ``model`` fitted on the
    others."""
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    with threadpool_limits(1, user_api="blas"):
        return cross_val_predict(model, X, y, cv=cv, method="predict_proba")


def logistic_oof(X, y, folds=5, seed=0, C=OOF_C) -> np.ndarray:
    """Out-of-fold probabilities of :func:`logistic` with ``C``."""
    return cross_validated(logistic(seed, C), X, y, folds, seed)


def discriminant_oof(X, y, folds=5, seed=0, components=LDA_COMPONENTS) -> np.ndarray:
    """Out-of-fold probabilities of a linear discriminant analysis (one covariance shared by the classes,
    Ledoit-Wolf shrinkage) on the first ``components`` principal components (at most the features and the
    rows of a training fold). A class with one image in a training fold adds no covariance of its own (scikit-learn
    warns; the warning is dropped)."""
    d = max(1, min(components, X.shape[1], len(y) - math.ceil(len(y) / folds)))
    model = make_pipeline(PCA(d, random_state=seed), LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Only one sample available", UserWarning)
        return cross_validated(model, X, y, folds, seed)


def knn_vote(X, y, k=KNN_K, temperature=KNN_TEMPERATURE) -> np.ndarray:
    """Leave-one-out probabilities (N, K) of labels 0..K-1: each row's ``k`` most cosine-similar other rows
    vote for their labels, weighted by exp(similarity / ``temperature``), smoothed."""
    n_classes = int(y.max()) + 1
    sims, idx = knn.nearest(X, X, k, same=True)
    w = np.exp((sims.astype(np.float64) - 1) / temperature)
    votes = np.zeros((len(y), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(y)), idx.shape[1]), y[idx].ravel()), w.ravel())
    votes += KNN_SMOOTHING * np.maximum(votes.sum(axis=1, keepdims=True), 1e-12)
    return votes / votes.sum(axis=1, keepdims=True)


def out_of_fold(X, y, folds=5, seed=0) -> np.ndarray:
    """Out-of-fold predicted probabilities (N, classes present, in label order; labels 0..K-1): the mean of
    :func:`logistic_oof`, :func:`discriminant_oof` and :func:`knn_vote`, temperature-scaled to the lowest NLL
    of ``y``. The blend of a strongly regularised head, a shrunk discriminant and a smoothed vote is
    under-confident; calibrated, confident learning's count of label issues comes out right."""
    blend = (logistic_oof(X, y, folds, seed) + discriminant_oof(X, y, folds, seed) + knn_vote(X, y)) / 3
    return calibration.scaled(blend, calibration.fit_temperature(blend, y))


def score_and_flag(y, probs) -> tuple[np.ndarray, np.ndarray]:
    """(label quality of every row, mask of the label issues) of labels 0..K-1 ``y`` and out-of-fold ``probs``:
    the issues are the ``num_label_issues`` rows of lowest quality, the count estimated from the calibrated
    confident joint (count, then rank)."""
    quality = get_label_quality_scores(y, probs)
    n = int(num_label_issues(y, probs, estimation_method="off_diagonal_calibrated"))
    mask = np.zeros(len(y), bool)
    mask[np.argsort(quality, kind="stable")[:n]] = True
    return quality, mask


def find(X, y, names, paths, splits, folds=5, seed=0) -> dict:
    """Label issues of the rows (X, y): {"rows": the flagged, worst first, "quality": every row's score,
    "flagged": mask, "probs": out-of-fold probabilities (N, len(names))}."""

    check_folds(y, len(names), folds, names)
    present = np.unique(y)
    remap = np.searchsorted(present, y)  # cleanlab wants labels 0..K-1 of the classes present
    probs_present = out_of_fold(X, remap, folds, seed)
    quality, flagged = score_and_flag(remap, probs_present)
    probs = np.zeros((len(y), len(names)))
    probs[:, present] = probs_present
    suggested = np.argmax(probs, axis=1)
    rows = [{"path": str(paths[i]), "split": str(splits[i]), "given": names[y[i]], "suggested": names[suggested[i]],
             "quality": float(quality[i]), "p_given": float(probs[i, y[i]]),
             "p_suggested": float(probs[i, suggested[i]])}
            for i in np.flatnonzero(flagged)]
    rows.sort(key=lambda r: r["quality"])
    return {"rows": rows, "quality": quality, "flagged": flagged, "probs": probs}
