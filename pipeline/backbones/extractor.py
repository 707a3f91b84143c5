"""The frozen feature extractor: raw RGB pixels -> backbone's preprocessing -> backbone -> pooling."""

from __future__ import annotations

import keras
import tensorflow as tf

from pipeline.backbones import fold as folding, registry
from pipeline.backbones.layers import GeneralizedMeanPooling2D, Preprocess
from pipeline.errors import choose

POOLING_LAYERS = {
    "avg": keras.layers.GlobalAveragePooling2D,
    "max": keras.layers.GlobalMaxPooling2D,
    "flatten": keras.layers.Flatten,
    "gem": GeneralizedMeanPooling2D,
}
GEM_P = 3.0  # the default generalised-mean exponent (FeaturesConfig.gem_p)


def pooling_layer(pooling, gem_p=GEM_P):
    """The pooling layer of ``pooling`` (named ``<pooling>_pool``); ``gem`` takes its exponent ``gem_p``."""
    cls = choose(pooling, POOLING_LAYERS, "pooling")
    if pooling == "gem":
        return cls(p=gem_p, name="gem_pool")
    return cls(name=f"{pooling}_pool")


PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def build(spec, size, weights, pooling, alpha=None, seed=0, precision="float32", keras_home="", gem_p=GEM_P):
    """(extractor, base): ``extractor`` maps (N, size, size, 3) pixels in [0, 255] to pooled float32
    features (``gem_p``: the exponent of ``pooling="gem"``). ``precision`` other than float32: the layers
    compute in it (Keras mixed precision, weights kept in float32)."""
    pool = pooling_layer(pooling, gem_p)
    policy = choose(precision, PRECISIONS, "precision")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        base = registry.build_base(spec, size, weights, alpha=alpha, seed=seed, keras_home=keras_home)
        base.trainable = False
        inputs = keras.Input((size, size, 3), name="pixels")
        x = Preprocess(spec.preprocess, name="preprocess")(inputs)
        x = base(x, training=False)
        outputs = pool(x)
        if policy != "float32":
            outputs = keras.layers.Activation("linear", dtype="float32", name="to_float32")(outputs)
    finally:
        keras.config.set_dtype_policy(previous)
    return keras.Model(inputs, outputs, name=f"{spec.name}_features"), base


def inference(model, fold=False):
    """``x -> model(x, training=False)``; ``fold``: with its BatchNorm folded into the convolutions
    (:func:`pipeline.backbones.fold.folded`, which also counts them; the model is not changed)."""
    return folding.folded(model) if fold else (lambda x: model(x, training=False))


def compiled_call(model, size, fold=False):
    """``model`` as a compiled inference call on uint8 (N, size, size, 3) pixel batches; ``fold``: with its
    BatchNorm folded into the convolutions (:mod:`pipeline.backbones.fold`; the model is not changed). Autograph is
    off: a Keras model has no Python control flow to convert, and converting it costs a third of the
    tracing time."""
    spec = tf.TensorSpec((None, size, size, 3), tf.uint8)
    return tf.function(inference(model, fold), input_signature=[spec], autograph=False)
