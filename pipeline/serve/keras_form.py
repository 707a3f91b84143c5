"""Heads in Keras form, end to end on their backbone: what predict runs for a dense head and what export
exports (a dense head as the fine-tune model without augmentation, a linear scikit-learn head as one Dense
layer); on a feature ensemble one multi-branch model (:func:`ensemble_model`)."""

from __future__ import annotations

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from pipeline.backbones.extractor import POOLING_LAYERS
from pipeline.backbones.layers import InferenceMode, Preprocess
from pipeline.errors import PipelineError
from pipeline.finetune.model import build_model
from pipeline.serve.runner import LINEAR_HEADS

RESIZE = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "lanczos3"}  # Pillow's


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
    return build_model(spec, size, base, pooling, linear_head(est, rec), augment=None, gem_p=gem_p)


def linear_head(est, rec, stats=None):
    """Features -> scores of a linear scikit-learn head as one Dense layer (see :func:`linear_model`);
    ``stats`` (``{"mean", "std"}``): a standardisation applied before the head, folded in as well."""
    steps = [s for _, s in est.steps] if isinstance(est, Pipeline) else [est]
    clf, front = steps[-1], steps[:-1]
    if not isinstance(clf, (LogisticRegression, LinearSVC)) or any(not isinstance(s, StandardScaler) for s in front):
        raise PipelineError(f"{rec.get('head')} head: only linear heads ({', '.join(LINEAR_HEADS)}) become a Keras "
                            "layer, and dense heads and fine-tuned models export as they are; this one can only "
                            "run with make predict")
    coef = np.asarray(clf.coef_, np.float64)  # (k, d), k = 1 for two classes
    bias = np.asarray(clf.intercept_, np.float64).reshape(-1) * np.ones(coef.shape[0])
    d = coef.shape[1]
    affine = [((np.asarray(s.mean_, np.float64) if s.mean_ is not None and s.with_mean else np.zeros(d)),
               (np.asarray(s.scale_, np.float64) if s.scale_ is not None else np.ones(d))) for s in front]
    if stats is not None:
        affine.insert(0, (np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)))
    for mean, scale in reversed(affine):  # x -> (x - mean) / scale, folded into the weights
        coef = coef / scale
        bias = bias - coef @ mean
    k = coef.shape[0]
    act = ("softmax" if k > 1 else "sigmoid") if isinstance(clf, LogisticRegression) else None
    inputs = keras.Input((d,), name="features")
    dense_layer = keras.layers.Dense(k, activation=act, name="head_output")
    head = keras.Model(inputs, dense_layer(inputs), name=f"{rec.get('head')}open_head")
    dense_layer.set_weights([coef.T.astype(np.float32), bias.astype(np.float32)])
    return head


def standardised_dense(model, stats):
    """A copy of the dense head ``model`` with ``(x - mean) / std`` folded into its first Dense layer (only
    Dropout, inert in inference, may come before it)."""
    head = keras.models.clone_model(model)
    head.set_weights(model.get_weights())
    if stats is None:
        return head
    for layer in head.layers:
        if isinstance(layer, keras.layers.Dense):
            kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
            mean, std = (np.asarray(stats[k], np.float64) for k in ("mean", "std"))
            kernel = kernel / std[:, None]
            layer.set_weights([kernel.astype(np.float32), (bias - mean @ kernel).astype(np.float32)])
            return head
        if not isinstance(layer, (keras.layers.InputLayer, keras.layers.Dropout)):
            break
    raise PipelineError(f"{model.name}: a dense head whose first layer is not Dense; retrain it with make head")


def ensemble_model(branches, head, size, interpolation="bilinear", l2=True, name="ensemble"):
    """One multi-branch model of a feature ensemble: raw (N, ``size``, ``size``, 3) pixels in [0, 255] -> per
    branch ``(spec, branch size, base, pooling, gem_p)``: resized to its size when another (``interpolation``,
    in the graph), its backbone's preprocessing, ``base`` (``training=False``), ``pooling``, L2-normalised per
    row (``l2``) -> concatenated -> ``head`` (features -> scores, the standardisation folded in)."""
    inputs = keras.Input((size, size, 3), name="pixels")
    feats = []
    for i, (spec, s, base, pooling, gem_p) in enumerate(branches):
        x = inputs
        if s != size:
            x = keras.layers.Resizing(s, s, interpolation=RESIZE.get(interpolation, "bilinear"),
                                      name=f"resize_{i}")(x)
        x = Preprocess(spec.preprocess, name=f"preprocess_{i}")(x)
        x = InferenceMode(base, name=f"backbone_{i}")(x)
        pool = POOLING_LAYERS[pooling]
        x = (pool(p=gem_p, name=f"gem_pool_{i}") if pooling == "gem" else pool(name=f"{pooling}_pool_{i}"))(x)
        if l2:
            x = keras.layers.UnitNormalization(name=f"l2_{i}")(x)
        feats.append(x)
    x = keras.layers.Concatenate(name="members")(feats)
    return keras.Model(inputs, head(x), name=name)
