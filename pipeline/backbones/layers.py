"""The layers the pipeline adds around a backbone: its own preprocessing inside the model, and a wrapper that
keeps it in inference mode whatever ``fit`` says."""

from __future__ import annotations

import keras

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
