"""Heads in Keras form, end to end on their backbone: what predict runs for a dense head and what export
exports (a dense head as the fine-tune model without augmentation, a linear scikit-learn head as one Dense
layer)."""

from __future__ import annotations

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from pipeline.errors import PipelineError
from pipeline.finetune.model import build_model
from pipeline.serve.runner import LINEAR_HEADS


def head_model(est, rec, kind, spec, size, base, pooling, gem_p=3.0):
    """The head ``est`` (``kind`` dense or sklearn) on ``base`` as one Keras model: pixels -> the backbone's
    preprocessing -> ``base`` -> ``pooling`` -> the head."""
    if kind == "dense":
        return build_model(spec, size, base, pooling, est.model_, augment=None, gem_p=gem_p)
    return linear_model(est, rec, spec, size, base, pooling, gem_p)


def linear_model(est, rec, spec, size, base, pooling, gem_p=3.0):
    """A linear scikit-learn head (logreg, linear SVM, with the StandardScaler in front) on the backbone as one
    Keras model: the scaler folded into one Dense layer of the classifier's coefficients, then softmax
    (multinomial logistic regression), sigmoid (binary) or nothing (the SVM's decision values)."""
    steps = [s for _, s in est.steps] if isinstance(est, Pipeline) else [est]
    clf, front = steps[-1], steps[:-1]
    if not isinstance(clf, (LogisticRegression, LinearSVC)) or any(not isinstance(s, StandardScaler) for s in front):
        raise PipelineError(f"{rec.get('head')} head: only linear heads ({', '.join(LINEAR_HEADS)}) become a Keras "
                            "layer, and dense heads and fine-tuned models export as they are; this one can only "
                            "run with make predict")
    coef = np.asarray(clf.coef_, np.float64)  # (k, d), k = 1 for two classes
    bias = np.asarray(clf.intercept_, np.float64).reshape(-1) * np.ones(coef.shape[0])
    for s in reversed(front):  # x -> (x - mean) / scale, folded into the weights
        scale = np.asarray(s.scale_, np.float64) if s.scale_ is not None else np.ones(coef.shape[1])
        mean = np.asarray(s.mean_, np.float64) if s.mean_ is not None and s.with_mean else np.zeros(coef.shape[1])
        coef = coef / scale
        bias = bias - coef @ mean
    k, d = coef.shape
    act = ("softmax" if k > 1 else "sigmoid") if isinstance(clf, LogisticRegression) else None
    inputs = keras.Input((d,), name="features")
    dense_layer = keras.layers.Dense(k, activation=act, name="head_output")
    head = keras.Model(inputs, dense_layer(inputs), name=f"{rec.get('head')}open_head")
    dense_layer.set_weights([coef.T.astype(np.float32), bias.astype(np.float32)])
    return build_model(spec, size, base, pooling, head, augment=None, gem_p=gem_p)
