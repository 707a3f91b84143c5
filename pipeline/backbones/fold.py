"""Inference with BatchNorm folded into the convolution before it (frozen backbones only).

A frozen BatchNorm after a convolution is an affine map per channel, so ``bn(conv(x, K))`` equals
``conv(x, K * s) + b`` with ``s = gamma / sqrt(var + eps)`` and ``b = beta + (bias - mean) * s``. The
folded call runs the model's own graph with each such pair replaced by one convolution plus a bias
(which TensorFlow's graph optimiser fuses with the following ReLU): fewer ops to trace and to run. The
model itself is not touched — fine-tuning and export use it as built; :func:`folded` gives a separate
callable holding the folded weights, a snapshot of the model's weights when it was made.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import tensorflow as tf

from pipeline import keras_internals as internals
from pipeline.backbones.layers import InferenceMode

_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def folded(model):
    """A callable ``f(x) -> model(x, training=False)`` with every foldable (conv, BatchNorm) pair of
    ``model`` and its nested functional models (also inside ``InferenceMode``) folded; ``f.folds`` counts
    them (0: the model as is)."""
    plan = _Plan()
    plan.scan(model)

    def call(x):
        return plan.run(model, x) if internals.functional(model) else model(x, training=False)

    call.folds = len(plan.convs)
    return call


def _wrapped(op):
    """The functional model inside an :class:`InferenceMode` wrapper, else None."""
    return op.layer if isinstance(op, InferenceMode) and internals.functional(op.layer) else None


def _foldable(conv, bn) -> bool:
    """True when ``bn`` in inference is a per-output-channel affine map of ``conv``'s output alone."""
    return (isinstance(conv, _CONVS) and isinstance(bn, keras.layers.BatchNormalization)
            and internals.call_count(conv) == 1 and internals.call_count(bn) == 1
            and conv.data_format == "channels_last" and bn.axis in (-1, conv.rank + 1)
            and conv.activation in (None, keras.activations.linear) and not bn.renorm
            and conv.dtype_policy.compute_dtype == "float32" and bn.dtype_policy.compute_dtype == "float32")


def _folded_weights(conv, bn):
    """(kernel, bias) of ``conv`` followed by ``bn`` (inference statistics)."""
    mean, var = np.asarray(bn.moving_mean), np.asarray(bn.moving_variance)
    scale = 1.0 / np.sqrt(var.astype(np.float64) + bn.epsilon)
    if bn.scale:
        scale = scale * np.asarray(bn.gamma)
    bias = np.asarray(conv.bias, np.float64) if conv.use_bias else 0.0
    shift = (bias - mean) * scale + (np.asarray(bn.beta) if bn.center else 0.0)
    kernel, scale = np.asarray(conv.kernel, np.float32), scale.astype(np.float32)
    if isinstance(conv, keras.layers.DepthwiseConv2D):  # (kh, kw, in, mult): output channel c * mult + m
        kernel = kernel * scale.reshape(kernel.shape[-2:])
    else:  # (kh, kw, in / groups, out)
        kernel = kernel * scale
    return kernel, shift.astype(np.float32)


class _Plan:
    """Which layers are folded, their folded weights, and the walk that runs a model with them."""

    def __init__(self):
        self.convs = {}  # id(conv) -> (conv, folded kernel, bias) as backend tensors
        self.skipped = set()  # id(bn) of folded BatchNorms: identity

    def scan(self, model):
        if not internals.functional(model):
            return
        nodes = internals.graph_nodes(model)
        uses = {}
        for node in nodes:
            for t in node.input_tensors:
                uses[id(t)] = uses.get(id(t), 0) + 1
        for t in model.outputs:
            uses[id(t)] = uses.get(id(t), 0) + 1
        for node in nodes:
            op = node.operation
            if internals.functional(op) or _wrapped(op) is not None:
                self.scan(_wrapped(op) or op)
            elif isinstance(op, keras.layers.BatchNormalization) and len(node.input_tensors) == 1:
                x, parents = node.input_tensors[0], node.parent_nodes
                conv = parents[0].operation if len(parents) == 1 else None
                if uses.get(id(x)) == 1 and _foldable(conv, op):
                    kernel, bias = _folded_weights(conv, op)
                    self.convs[id(conv)] = (conv, keras.ops.convert_to_tensor(kernel),
                                            keras.ops.convert_to_tensor(bias))
                    self.skipped.add(id(op))

    def run(self, model, x):
        return internals.run_graph(model, x, self._op)

    def _op(self, op):
        if id(op) in self.convs:
            conv, kernel, bias = self.convs[id(op)]
            return lambda x, **_: _conv(conv, x, kernel, bias)
        if id(op) in self.skipped:
            return lambda x, **_: x
        if internals.functional(op) or _wrapped(op) is not None:
            inner = _wrapped(op) or op
            return lambda x, **_: self.run(inner, x)
        if "training" in inspect.signature(op.call).parameters:  # what Keras passes ``training`` to
            return lambda *a, **kw: op(*a, **{**kw, "training": False})
        return op


def _conv(conv, x, kernel, bias):
    """``conv``'s convolution with another kernel, plus a bias."""
    if isinstance(conv, keras.layers.DepthwiseConv2D):
        y = keras.ops.depthwise_conv(x, kernel, strides=conv.strides, padding=conv.padding,
                                     dilation_rate=conv.dilation_rate, data_format=conv.data_format)
    else:
        y = conv.convolution_op(x, kernel)
    return tf.nn.bias_add(y, bias)
