"""The ``audit`` bench section's measurements, on a loaded cache in memory with the audit's own functions:
planted label noise, held-out-class and far out-of-distribution rejection, calibration per head, and planted
leaks. Each returns plain figures (rates and ratios); :mod:`.audit` puts them in the table.
What a measurement needs (TensorFlow, Keras, the steps it runs) is imported lazily, in the function that
measures: ``make bench`` imports only the sections it runs."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from pipeline.configs import AuditConfig
from pipeline.reports.audit import calibration, labels, leaks, openset

LEVERS = {  # out-of-fold probabilities of (X, y, folds, seed); the audit's default last
    "logreg C=1": lambda X, y, f, s: labels.logistic_oof(X, y, f, s, C=1.0),
    f"logreg C={labels.OOF_C:g}": lambda X, y, f, s: labels.logistic_oof(X, y, f, s),
    f"kNN vote (k={labels.KNN_K})": lambda X, y, f, s: labels.knn_vote(X, y),
    f"shrinkage LDA ({labels.LDA_COMPONENTS} PCs)": labels.discriminant_oof,
    "blend (default)": labels.out_of_fold,
}
SCORES = ("max_probability", "energy", "knn_similarity", "relative_similarity", "relative_mahalanobis", "combined")
BOOTSTRAP = 200


def flip(y, rate, seed) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): ``rate`` of the rows (at least one) moved to another class at random."""
    rng, k = np.random.default_rng(seed), int(y.max()) + 1
    n = max(1, int(round(rate * len(y))))
    idx = rng.choice(len(y), n, replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, k, n)) % k
    mask = np.zeros(len(y), bool)
    mask[idx] = True
    return noisy, mask


def label_noise(X, y, rate, seeds, folds=5) -> dict:
    """Per lever: AUROC of the label quality (flipped vs not), precision of the N lowest (N flipped), recall and
    precision of the flags, flagged-not-flipped rows and how many of those are flagged on the clean
    labels too; each a list over ``seeds``, plus the rows flagged on the clean labels."""
    y = np.searchsorted(np.unique(y), y)
    out = {}
    for name, oof in LEVERS.items():
        clean = labels.score_and_flag(y, oof(X, y, folds, 0))[1]
        figs = {k: [] for k in ("auroc", "top_n_precision", "recall", "precision", "flagged", "extra",
                                "extra_on_clean")}
        for seed in seeds:
            noisy, flipped = flip(y, rate, seed)
            p = oof(X, noisy, folds, seed)
            q, f = labels.score_and_flag(noisy, p)
            n, hit = int(flipped.sum()), int((f & flipped).sum())
            figs["auroc"].append(float(roc_auc_score(flipped, -q)))
            figs["top_n_precision"].append(float(flipped[np.argsort(q, kind="stable")[:n]].mean()))
            figs["recall"].append(hit / n)
            figs["precision"].append(hit / max(int(f.sum()), 1))
            figs["flagged"].append(int(f.sum()))
            figs["extra"].append(int((f & ~flipped).sum()))
            figs["extra_on_clean"].append(int((f & ~flipped & clean).sum()))
        out[name] = {"per_seed": figs, "mean": {k: float(np.mean(v)) for k, v in figs.items()},
                     "flipped": int(flipped.sum()), "clean_flagged": np.flatnonzero(clean).tolist()}
    return out


def _head(Xtr, ytr, seed):
    model = labels.logistic(seed)
    with threadpool_limits(1, user_api="blas"):
        model.fit(Xtr, ytr)
    return model


def _scores(model, t, X, train_X, gaussians, density) -> tuple[dict, dict]:
    """(every rejection score of the rows X but the combined one (higher = more known), the audit's raw scores
    the combined one is made of)."""
    z = model.decision_function(X)
    raw = openset.raw_scores(calibration.scaled(z, t), X, train_X, gaussians, AuditConfig.neighbours, density)
    return {"max_probability": raw["max_probability"], "energy": logsumexp(z, axis=1),
            "knn_similarity": raw["train_similarity"], "relative_similarity": raw["relative_similarity"],
            "relative_mahalanobis": raw["relative_mahalanobis"]}, raw


def rejection(train, val, known, unknown, seed, recall) -> dict:
    """A head fitted on ``train`` (X, y); T and the combined score's standardiser on ``val``: AUROC of every score
    (known vs unknown rows) and the share of unknown rows below the threshold keeping ``recall`` of known val."""
    model = _head(*train, seed)
    t = calibration.fit_temperature(model.decision_function(val[0]), np.searchsorted(model.classes_, val[1]))
    density, gaussians = openset.train_density(train[0], AuditConfig.neighbours), openset.fit_gaussians(*train)
    (sv, rv), (sk, rk), (su, ru) = (_scores(model, t, x, train[0], gaussians, density)
                                    for x in (val[0], known, unknown))
    stats = openset.standardiser(rv)
    for scores, raw in ((sv, rv), (sk, rk), (su, ru)):
        scores["combined"] = openset.combined(raw, stats)
    out = {}
    for name in SCORES:
        th = openset.choose_threshold(sv[name], recall)
        y = np.r_[np.ones(len(sk[name])), np.zeros(len(su[name]))]
        out[name] = {"auroc": float(roc_auc_score(y, np.r_[sk[name], su[name]])),
                     "rejected": float(openset.rejected(su[name], th).mean()),
                     "known_recall": float(1 - openset.rejected(sk[name], th).mean())}
    return out


def open_set(cache, seed=0, recall=0.95) -> dict:
    """Each class held out in turn: trained on the others' train rows, scored on their test rows (known) and
    every row of the held-out class (unknown)."""
    tr, va, te = cache.train, cache.val, cache.test
    per = {}
    for h, name in enumerate(cache.class_names):
        keep = [sp.labels != h for sp in (tr, va, te)]
        unknown = np.concatenate([sp.features[sp.labels == h] for sp in (tr, va, te)])
        per[name] = rejection((tr.features[keep[0]], tr.labels[keep[0]]), (va.features[keep[1]], va.labels[keep[1]]),
                              te.features[keep[2]], unknown, seed, recall)
    mean = {s: {k: float(np.mean([p[s][k] for p in per.values()])) for k in ("auroc", "rejected", "known_recall")}
            for s in SCORES}
    return {"per_class": per, "mean": mean}


def far_ood(cache, outside, seed=0, recall=0.95) -> dict:
    """Trained on every class: the test rows (known) against ``outside`` features (unknown)."""
    tr, va = cache.train, cache.val
    return rejection((tr.features, tr.labels), (va.features, va.labels), cache.test.features, outside, seed, recall)


def _ece_interval(p, y, seed) -> list[float]:
    rng = np.random.default_rng(seed)
    draws = [calibration.ece(p[i], y[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(BOOTSTRAP))]
    return [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))]


def calibrate(probs_val, y_val, probs_test, y_test, seed=0) -> dict:
    """T fitted on val; test NLL and ECE (95% bootstrap interval) before and after."""
    t = calibration.fit_temperature(probs_val, y_val)
    out = {"temperature": t, "accuracy": float((probs_test.argmax(1) == y_test).mean())}
    for when, p in (("before", probs_test), ("after", calibration.scaled(probs_test, t))):
        out[when] = {"nll": calibration.nll(p, y_test), "ece": calibration.ece(p, y_test),
                     "ece_interval": _ece_interval(p, y_test, seed)}
    return out


def mean_calibration(runs: list[dict]) -> dict:
    """:func:`calibrate`'s figures averaged over runs (split seeds), each run kept under "per_seed"."""
    out = {"temperature": float(np.mean([r["temperature"] for r in runs])),
           "accuracy": float(np.mean([r["accuracy"] for r in runs])), "per_seed": runs}
    for when in ("before", "after"):
        out[when] = {k: float(np.mean([r[when][k] for r in runs])) for k in ("nll", "ece")}
    return out


def head_probs(cache, head, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(val, test) probabilities of ``head`` (logreg: the audit's; dense: the pipeline's) fitted on train."""
    tr, va, te = cache.train, cache.val, cache.test
    if head == "logreg":
        model = _head(tr.features, tr.labels, seed)
    else:
        from pipeline.heads import registry
        from pipeline.heads.train import fit

        model = registry.build(head, seed=seed)
        fit(head, model, tr.features, tr.labels, (va.features, va.labels))
    return model.predict_proba(va.features), model.predict_proba(te.features)


def photo(path) -> str:
    """The photo a file shows, by name: Flickr-style names share their first two ``_`` fields across sizes."""
    stem = os.path.splitext(os.path.basename(str(path)))[0]
    return "_".join(stem.split("_")[:2])


def leak_check(cache, planted: dict) -> dict:
    """Near pairs on the clean cache (each a copy by content hash, the same photo by name, or false) and the
    planted test copies found: ``planted`` = {"features", "paths" (original train path of each), "kinds",
    "hashes"}."""
    cfg = AuditConfig()
    th = leaks.threshold(cache.train.features, cfg.near_quantile, cfg.near_fraction)
    hashes = leaks.stored_hashes(cache)
    others = {s: cache.splits[s] for s in ("val", "test") if s in cache.splits}
    pairs = leaks.near(cache.train, others, th["distance"])
    index = {s: dict(zip(map(str, cache.splits[s].paths), h)) for s, h in (hashes or {}).items()}
    same = [bool(index) and index[p["split"]][p["path"]] == index["train"][p["train_path"]]
            or photo(p["path"]) == photo(p["train_path"]) for p in pairs]
    fake = SimpleNamespace(features=planted["features"], paths=np.asarray(planted["paths"]),
                           labels=np.zeros(len(planted["paths"]), int))
    found = {(p["path"], p["train_path"]) for p in leaks.near(cache.train, {"test": fake}, th["distance"])}
    kinds = sorted(set(planted["kinds"]))
    near_found = {k: float(np.mean([(p, p) in found for p, kk in zip(planted["paths"], planted["kinds"]) if kk == k]))
                  for k in kinds}
    exact_found = None  # no content hashes in the cache: not measured
    if index:
        groups = leaks.exact({"train": list(index["train"].values()), "test": planted["hashes"]},
                             {"train": list(index["train"]), "test": planted["names"]})
        caught = {p for g in groups if g["across"] for p in g["paths"]}
        copies = [n for n, k in zip(planted["names"], planted["kinds"]) if k == "exact"]
        exact_found = float(np.mean([n in caught for n in copies]))
    return {"distance": th["distance"], "clean_pairs": len(pairs), "clean_same_photo": int(sum(same)),
            "clean_false": int(len(pairs) - sum(same)), "clean_list": pairs, "near_found": near_found,
            "exact_found": exact_found, "exact_other": len(caught - set(copies)) if index else None, "planted": len(planted["paths"])}
