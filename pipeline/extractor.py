"""The frozen feature extractor: raw RGB pixels -> backbone's preprocessing -> backbone -> pooling."""

from __future__ import annotations

import keras

from pipeline import backbones
from pipeline.errors import choose

LITE0_MEAN, LITE0_STD = 127.0, 128.0


@keras.saving.register_keras_serializable(package="pipeline")
class Preprocess(keras.layers.Layer):
    """A backbone family's own ``preprocess_input``, inside the model (tensors are never changed in place).

    Modes as in keras.applications: ``caffe`` (RGB->BGR, ImageNet mean subtracted), ``tf`` ([-1, 1]),
    ``torch`` ([0, 1], ImageNet mean/std), ``lite0`` ((x - 127) / 128), ``none`` (the backbone does it).
    """

    MODES = ("caffe", "tf", "torch", "lite0", "none")

    def __init__(self, mode, **kwargs):
        super().__init__(**kwargs)
        choose(mode, dict.fromkeys(self.MODES), "preprocessing mode")
        self.mode = mode

    def call(self, x):
        x = keras.ops.cast(x, "float32")
        if self.mode == "none":
            return x
        if self.mode == "lite0":
            return (x - LITE0_MEAN) / LITE0_STD
        return keras.applications.imagenet_utils.preprocess_input(x, mode=self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="pipeline")
class InferenceMode(keras.layers.Layer):
    """Runs the wrapped backbone with ``training=False`` whatever the caller says.

    Keras 3's functional models hand ``fit``'s ``training=True`` down to every layer, overriding the
    ``training=False`` recorded when the graph was built: frozen BatchNorm is safe (``trainable=False``
    makes it infer), but the backbone's Dropout / drop-connect would switch on. Its weights stay trainable
    as their own ``trainable`` flags say.
    """

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)

    def call(self, x):
        return self.layer(x, training=False)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "layer": keras.saving.serialize_keras_object(self.layer)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)


POOLING_LAYERS = {
    "avg": keras.layers.GlobalAveragePooling2D,
    "max": keras.layers.GlobalMaxPooling2D,
    "flatten": keras.layers.Flatten,
}


PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def build(spec, size, weights, pooling, alpha=None, seed=0, precision="float32"):
    """(extractor, base): ``extractor`` maps (N, size, size, 3) pixels in [0, 255] to pooled float32
    features. ``precision`` other than float32: the layers compute in it (Keras mixed precision, weights
    kept in float32)."""
    pool = choose(pooling, POOLING_LAYERS, "pooling")
    policy = choose(precision, PRECISIONS, "precision")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        base = backbones.build_base(spec, size, weights, alpha=alpha, seed=seed)
        base.trainable = False
        inputs = keras.Input((size, size, 3), name="pixels")
        x = Preprocess(spec.preprocess, name="preprocess")(inputs)
        x = base(x, training=False)
        outputs = pool(name=f"{pooling}_pool")(x)
        if policy != "float32":
            outputs = keras.layers.Activation("linear", dtype="float32", name="to_float32")(outputs)
    finally:
        keras.config.set_dtype_policy(previous)
    return keras.Model(inputs, outputs, name=f"{spec.name}_features"), base


def inference(model, fold=False):
    """``x -> model(x, training=False)``; ``fold``: with its BatchNorm folded into the convolutions
    (:func:`pipeline.fold.folded`, which also counts them; the model is not changed)."""
    from pipeline import fold as folding

    return folding.folded(model) if fold else (lambda x: model(x, training=False))


def compiled_call(model, size, fold=False):
    """``model`` as a compiled inference call on uint8 (N, size, size, 3) pixel batches; ``fold``: with its
    BatchNorm folded into the convolutions (:mod:`pipeline.fold`; the model is not changed). Autograph is
    off: a Keras model has no Python control flow to convert, and converting it costs a third of the
    tracing time."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, size, size, 3), tf.uint8)
    return tf.function(inference(model, fold), input_signature=[spec], autograph=False)
