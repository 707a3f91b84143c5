"""EfficientNet-Lite0's architecture in Keras 3: EfficientNet-B0 without squeeze-excitation, ReLU6, unscaled
stem and head, TensorFlow ``SAME`` padding and BatchNorm eps 1e-3, as the TF-converted checkpoint expects."""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError

MEAN, STD = 127.0, 128.0
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
# (kernel, repeats, filters_in, filters_out, expand_ratio, strides), as EfficientNet-B0 without SE
BLOCKS = [(3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
          (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1)]



def preprocess_input(x):
    """Pixels in [0, 255] -> (x - 127) / 128, as float32; a new array or tensor, never in place."""
    import keras

    if keras.ops.is_tensor(x):
        return (keras.ops.cast(x, "float32") - MEAN) / STD
    return (np.asarray(x, dtype=np.float32) - MEAN) / STD


def blocks():
    """(keras prefix, kernel, filters_in, filters_out, expand_ratio, strides) of every block, in order."""
    out = []
    for i, (k, repeats, f_in, f_out, expand, strides) in enumerate(BLOCKS):
        for j in range(repeats):
            out.append((f"block{i + 1}{chr(97 + j)}_", k, f_in if j == 0 else f_out, f_out, expand,
                        strides if j == 0 else 1))
    return out


def _conv_bn(x, filters, kernel, name, bn_name, act_name=None, strides=1, depthwise=False):
    """Conv (TF 'same' padding, as the original) -> BatchNorm -> optional ReLU6."""
    from keras import layers

    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides, padding="same", use_bias=False, name=name)(x)
    else:
        x = layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=bn_name)(x)
    return layers.Activation("relu6", name=act_name)(x) if act_name else x


def _block(x, name, kernel, f_in, f_out, expand, strides, drop_rate):
    """An inverted residual block without squeeze-excitation."""
    from keras import layers

    inputs = x
    if expand != 1:
        x = _conv_bn(x, f_in * expand, 1, f"{name}expand_conv", f"{name}expand_bn", f"{name}expand_activation")
    x = _conv_bn(x, None, kernel, f"{name}dwconv", f"{name}bn", f"{name}activation", strides, depthwise=True)
    x = _conv_bn(x, f_out, 1, f"{name}project_conv", f"{name}project_bn")
    if strides == 1 and f_in == f_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}drop")(x)
        x = layers.add([x, inputs], name=f"{name}add")
    return x


def build(include_top=False, input_tensor=None, input_shape=None, pooling=None, classes=1000,
          classifier_activation="softmax", dropout_rate=0.2, drop_connect_rate=0.2):
    """EfficientNet-Lite0's layers with random weights; inputs must already be ``preprocess_input``-ed."""
    import keras
    from keras import layers

    if pooling not in (None, "avg", "max"):
        raise PipelineError(f"pooling must be None, 'avg' or 'max', not {pooling!r}")
    shape = input_shape or ((224, 224, 3) if include_top else (None, None, 3))
    inputs = keras.Input(shape) if input_tensor is None else input_tensor
    x = _conv_bn(inputs, 32, 3, "stem_conv", "stem_bn", "stem_activation", strides=2)
    all_blocks = blocks()
    for b, args in enumerate(all_blocks):
        x = _block(x, *args, drop_rate=drop_connect_rate * b / len(all_blocks))
    x = _conv_bn(x, 1280, 1, "top_conv", "top_bn", "top_activation")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate > 0:
            x = layers.Dropout(dropout_rate, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    sources = inputs if input_tensor is None else keras.utils.get_source_inputs(input_tensor)
    return keras.Model(sources, x, name="efficientnet_lite0")
