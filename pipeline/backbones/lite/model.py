"""The EfficientNet-Lite family's architecture in Keras 3: EfficientNet without squeeze-excitation, ReLU6,
TensorFlow ``SAME`` padding and BatchNorm eps 1e-3, as the TF-converted checkpoints expect.

A member scales EfficientNet-Lite0's blocks by a width and a depth multiplier (as EfficientNet does) but keeps
the stem (32 filters), the head (1280 filters) and the repeats of the first and last stage fixed
(``fix_head_stem`` of the original builder); the packages' checkpoints have exactly these shapes."""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
import numpy as np
from keras import layers

from pipeline.errors import PipelineError

MEAN, STD = 127.0, 128.0
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
STEM, HEAD, DIVISOR = 32, 1280, 8
# (kernel, repeats, filters_in, filters_out, expand_ratio, strides) of EfficientNet-B0 without SE: Lite0's stages
BLOCKS = [(3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
          (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1)]


class Member(NamedTuple):
    """One member of the family: multipliers, native resolution, the classifier's dropout."""

    width: float
    depth: float
    resolution: int
    dropout: float


# efficientnet_lite_builder.efficientnet_lite_params of the original TensorFlow implementation
MEMBERS = {"lite0": Member(1.0, 1.0, 224, 0.2), "lite1": Member(1.0, 1.1, 240, 0.2),
           "lite2": Member(1.1, 1.2, 260, 0.3)}


def member(name: str) -> Member:
    if name not in MEMBERS:
        raise PipelineError(f"unknown EfficientNet-Lite member {name!r}; valid: {', '.join(MEMBERS)}")
    return MEMBERS[name]


def preprocess_input(x):
    """Pixels in [0, 255] -> (x - 127) / 128, as float32; a new array or tensor, never in place."""
    if keras.ops.is_tensor(x):
        return (keras.ops.cast(x, "float32") - MEAN) / STD
    return (np.asarray(x, dtype=np.float32) - MEAN) / STD


def round_filters(filters: int, width: float, divisor: int = DIVISOR) -> int:
    """``filters`` scaled by ``width``, rounded to a multiple of ``divisor`` never more than 10% below it."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def stages(name: str = "lite0") -> list[tuple]:
    """The member's stages as ``BLOCKS`` rows: filters by width, repeats by depth (ceil), except the stem's
    input and the first and last stage's repeats, which stay fixed."""
    m = member(name)
    out = []
    for i, (k, repeats, f_in, f_out, expand, strides) in enumerate(BLOCKS):
        if 0 < i < len(BLOCKS) - 1:
            repeats = int(math.ceil(m.depth * repeats))
        f_in = STEM if i == 0 else round_filters(f_in, m.width)
        out.append((k, repeats, f_in, round_filters(f_out, m.width), expand, strides))
    return out


def blocks(name: str = "lite0"):
    """(keras prefix, kernel, filters_in, filters_out, expand_ratio, strides) of every block, in order."""
    out = []
    for i, (k, repeats, f_in, f_out, expand, strides) in enumerate(stages(name)):
        for j in range(repeats):
            out.append((f"block{i + 1}{chr(97 + j)}_", k, f_in if j == 0 else f_out, f_out, expand,
                        strides if j == 0 else 1))
    return out


def _conv_bn(x, filters, kernel, name, bn_name, act_name=None, strides=1, depthwise=False):
    """Conv (TF 'same' padding, as the original) -> BatchNorm -> optional ReLU6."""
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides, padding="same", use_bias=False, name=name)(x)
    else:
        x = layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=bn_name)(x)
    return layers.Activation("relu6", name=act_name)(x) if act_name else x


def _block(x, name, kernel, f_in, f_out, expand, strides, drop_rate):
    """An inverted residual block without squeeze-excitation."""
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
          classifier_activation="softmax", dropout_rate=None, drop_connect_rate=0.2, name="lite0"):
    """The layers of EfficientNet-Lite ``name`` (lite0, lite1, lite2) with random weights; inputs must already
    be ``preprocess_input``-ed. ``dropout_rate`` None: the member's own (0.2, 0.2, 0.3)."""
    m = member(name)
    if pooling not in (None, "avg", "max"):
        raise PipelineError(f"pooling must be None, 'avg' or 'max', not {pooling!r}")
    dropout_rate = m.dropout if dropout_rate is None else dropout_rate
    shape = input_shape or ((m.resolution, m.resolution, 3) if include_top else (None, None, 3))
    inputs = keras.Input(shape) if input_tensor is None else input_tensor
    x = _conv_bn(inputs, STEM, 3, "stem_conv", "stem_bn", "stem_activation", strides=2)
    all_blocks = blocks(name)
    for b, args in enumerate(all_blocks):
        x = _block(x, *args, drop_rate=drop_connect_rate * b / len(all_blocks))
    x = _conv_bn(x, HEAD, 1, "top_conv", "top_bn", "top_activation")
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
    return keras.Model(sources, x, name=f"efficientnet_{name}")
