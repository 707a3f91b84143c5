"""The layers the pipeline adds around a backbone: its own preprocessing inside the model, and a wrapper that
keeps it in inference mode whatever ``fit`` says."""

from __future__ import annotations

import keras

from pipeline.errors import PipelineError, choose

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


GEM_EPS = 1e-6  # activations are clamped at this before the power (ReLU outputs are 0 at places)


@keras.saving.register_keras_serializable(package="pipeline")
class GeneralizedMeanPooling2D(keras.layers.Layer):
    """Generalised-mean (GeM) pooling of a (N, H, W, C) feature map: ``mean_{H,W}(max(x, eps)^p)^(1/p)`` per
    channel, computed in float32. ``p=1`` is average pooling; a large ``p`` tends to max pooling. ``p`` is a
    fixed option, not a trained weight."""

    def __init__(self, p=3.0, eps=GEM_EPS, **kwargs):
        super().__init__(**kwargs)
        p = float(p)
        if not p > 0 or p != p or p == float("inf"):
            raise PipelineError(f"GEM_P={p:g}: the generalised-mean exponent must be a finite number above 0")
        self.p, self.eps = p, float(eps)

    def call(self, x):
        x = keras.ops.maximum(keras.ops.cast(x, "float32"), self.eps)
        m = keras.ops.mean(keras.ops.power(x, self.p), axis=(1, 2))
        return keras.ops.power(m, 1.0 / self.p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "p": self.p, "eps": self.eps}
