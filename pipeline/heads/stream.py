"""Heads past MEMORY_BUDGET, on a cache of lazy rows (:mod:`pipeline.cache.lazy`): ``logreg`` becomes
:class:`StreamingLogReg` (said in one line), ``dense`` reads its batches from the file, and the heads that
hold every row (or more) in memory refuse in one line naming what to use.

:class:`StreamingLogReg` is multinomial-free logistic regression by stochastic gradient: a first pass fits the
standardisation (``StandardScaler.partial_fit``), then each epoch ``SGDClassifier(loss="log_loss").partial_fit``
sees the rows in a fresh random order of 1,024-row runs (contiguous reads, mixed in groups of eight so that a
class-sorted file still gives mixed steps), with averaged SGD (Polyak averaging: the averaged weights converge
at the rate of the full-batch solver without a tuned learning-rate decay) under scikit-learn's "optimal"
1/(alpha (t + t0)) schedule; it stops when val accuracy has not improved for ``patience`` epochs and keeps the
best epoch's model. Memory: one group of rows at a time."""

from __future__ import annotations

import copy
import os
import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import SGDClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from pipeline.cache import lazy
from pipeline.errors import PipelineError

RUN = 1024  # rows read contiguously
MIX = 8  # runs mixed into one partial_fit step
SCALABLE = ("logreg", "dense")


class StreamingLogReg(ClassifierMixin, BaseEstimator):
    """Standardise -> logistic regression by averaged SGD over blocks of rows (arrays or lazy rows).
    ``c``: as LogisticRegression's C (alpha = 1 / (C n)); learned ``classes_``, ``scaler_``, ``clf_``,
    ``history_`` (val accuracy per epoch), ``best_epoch_``."""

    def __init__(self, c=1.0, epochs=20, patience=3, class_weight=None, seed=0):
        self.c = c
        self.epochs = epochs
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed

    def _scaled(self, X):
        for a, rows in lazy.blocks(X):
            yield a, self.scaler_.transform(np.asarray(rows, np.float32))

    def _steps(self, X, y, rng):
        """(rows, labels) of one epoch: runs of RUN rows in random order, MIX runs a step, shuffled."""
        starts = rng.permutation(np.arange(0, len(y), RUN))
        for g in range(0, len(starts), MIX):
            runs = np.sort(starts[g:g + MIX])
            rows = np.concatenate([np.asarray(X[a:a + RUN], np.float32) for a in runs])  # contiguous reads
            labels = np.concatenate([y[a:a + RUN] for a in runs])
            order = rng.permutation(len(labels))
            yield self.scaler_.transform(rows[order]), labels[order]

    def fit(self, X, y, validation_data=None):
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError("StreamingLogReg needs at least two classes")
        self.scaler_ = StandardScaler()
        for _, rows in lazy.blocks(X):
            self.scaler_.partial_fit(np.asarray(rows, np.float32))
        weights = None
        if self.class_weight == "balanced":
            counts = np.bincount(np.searchsorted(self.classes_, y), minlength=len(self.classes_))
            weights = dict(zip(self.classes_.tolist(), len(y) / (len(self.classes_) * counts)))
        self.clf_ = SGDClassifier(loss="log_loss", alpha=1.0 / (self.c * len(y)), average=True,
                                  class_weight=weights, random_state=self.seed)
        rng, best, wait = np.random.default_rng(self.seed), None, 0
        self.history_ = {"val_accuracy": []}
        for epoch in range(self.epochs):
            for rows, labels in self._steps(X, y, rng):
                self.clf_.partial_fit(rows, labels, classes=self.classes_)
            if validation_data is None:
                continue
            acc = float(np.mean(self.predict(validation_data[0]) == np.asarray(validation_data[1])))
            self.history_["val_accuracy"].append(acc)
            if best is None or acc > best[0]:
                best, wait = (acc, epoch, copy.deepcopy(self.clf_)), 0
            elif (wait := wait + 1) >= self.patience:
                break
        if best is not None:
            self.clf_, self.best_epoch_ = best[2], best[1]
        return self

    def decision_function(self, X):
        check_is_fitted(self, "clf_")
        return np.concatenate([self.clf_.decision_function(rows) for _, rows in self._scaled(X)]
                              or [np.zeros((0, len(self.classes_)))])

    def predict_proba(self, X):
        """The softmax of the one-vs-rest margins (scikit-learn's normalised sigmoids saturate to ties at 1
        on well-separated rows, which breaks the ranking)."""
        s = np.asarray(self.decision_function(X), np.float64)
        if s.ndim == 1:
            s = np.column_stack([-s, s]) / 2
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def refuse(name: str, cache, budget: str) -> PipelineError:
    """The one-line refusal of a head that holds every row in memory."""
    n = sum(len(sp.labels) for sp in cache.splits.values())
    return PipelineError(f"HEAD={name}: {os.path.basename(cache.path)} ({n} rows) is past MEMORY_BUDGET={budget} "
                         f"and {name} needs every row in memory; use HEAD=logreg (streamed) or HEAD=dense, "
                         "or raise MEMORY_BUDGET")


def train_past_budget(cache, cfg, name: str, params: dict, log=print) -> dict:
    """Fit head ``name`` on a cache of lazy rows: logreg streamed (said in one line), dense from the file, the
    others refused; then evaluate and save it as :func:`pipeline.heads.train.finish` does."""
    from pipeline.heads import train  # imported lazily: train imports this module

    if name not in SCALABLE:
        raise refuse(name, cache, cfg.memory_budget)
    if name == "dense":
        return train.train_head(cache, cfg, name, params, log)
    train.check_splits(cache)
    tr, va = cache.splits["train"], cache.splits["val"]
    log(f"logreg: {os.path.basename(cache.path)} is past MEMORY_BUDGET={cfg.memory_budget}: streaming it "
        f"(SGD, log loss, early stopping on val) instead of fitting it in memory")
    est = StreamingLogReg(c=params["c"], class_weight=params.get("class_weight"), seed=cfg.head_seed)
    t0 = time.perf_counter()
    est.fit(tr.features, tr.labels, (va.features, va.labels))
    secs = time.perf_counter() - t0
    log(f"fitted in {secs:.2f} s (best of {len(est.history_['val_accuracy'])} epochs: {est.best_epoch_ + 1})")
    return train.finish(est, cache, cfg, "logreg", "logreg", params,
                        {"fit_seconds": secs, "trained_on": "train", "streamed": True, "views": 0}, log)
