"""BatchNorm folding: the folded call computes what the model computes, and leaves the model as it was."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MOBILENET_V2_FILE, require_shared

from pipeline.backbones import extractor, fold, layers
from pipeline.backbones import registry as backbones


def _randomise_batchnorm(model, seed=0):
    """Non-trivial inference statistics (fresh layers have mean 0, variance 1, gamma 1, beta 0)."""
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            for w in layer.weights:
                v = rng.uniform(0.5, 2.0, w.shape) if "variance" in w.path or "gamma" in w.path \
                    else rng.normal(0, 0.5, w.shape)
                w.assign(v.astype("float32"))


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _mixed_model():
    """Every case: foldable pairs and pairs that must stay apart, in a nested model."""
    inner_in = keras.Input((12, 12, 4))
    a = keras.layers.Conv2D(6, 3, padding="same", use_bias=True, name="conv_bias")(inner_in)
    a = keras.layers.BatchNormalization(center=False, name="bn_no_beta")(a)  # folded
    b = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, use_bias=False, name="dw")(a)
    b = keras.layers.BatchNormalization(scale=False, epsilon=1e-3, name="bn_no_gamma")(b)  # folded
    b = keras.layers.ReLU(6.0)(b)
    c = keras.layers.Conv2D(8, 1, groups=2, use_bias=False, name="grouped")(b)
    c = keras.layers.BatchNormalization(name="bn_grouped")(c)  # folded
    shared = keras.layers.Conv2D(8, 1, use_bias=False, name="conv_used_twice")(b)
    d = keras.layers.BatchNormalization(name="bn_of_shared")(shared)  # not folded: the conv output is reused
    d = keras.layers.Add()([d, shared, c])
    e = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_relu")(d)
    e = keras.layers.BatchNormalization(name="bn_after_relu")(e)  # not folded: a ReLU sits between
    e = keras.layers.Dropout(0.5)(e)  # identity in inference
    inner = keras.Model(inner_in, e, name="inner")
    outer_in = keras.Input((12, 12, 4))
    x = inner(outer_in, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.BatchNormalization(name="bn_after_pool")(x)  # not folded: no convolution before it
    return keras.Model(outer_in, x)


def test_folded_call_equals_the_model_and_folds_only_what_it_may():
    model = _mixed_model()
    _randomise_batchnorm(model)
    x = np.random.default_rng(1).normal(size=(5, 12, 12, 4)).astype("float32")
    want = model(x, training=False).numpy()
    f = fold.folded(model)
    assert f.folds == 3
    np.testing.assert_allclose(f(x).numpy(), want, rtol=1e-5, atol=1e-5)
    traced = tf.function(f, autograph=False)
    np.testing.assert_allclose(traced(x).numpy(), want, rtol=1e-5, atol=1e-5)


def test_folding_leaves_the_model_and_its_weights_as_they_were():
    model = _mixed_model()
    _randomise_batchnorm(model)
    before = [w.numpy().copy() for w in model.weights]
    x = np.random.default_rng(2).normal(size=(3, 12, 12, 4)).astype("float32")
    want = model(x, training=False).numpy()
    fold.folded(model)(x)
    assert len(model.weights) == len(before)
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)
    np.testing.assert_array_equal(model(x, training=False).numpy(), want)


@pytest.mark.slow
def test_a_real_backbone_folds_every_batchnorm_and_gives_the_same_features():
    """MobileNetV2 alpha 0.35 with its ImageNet statistics: all 52 BatchNorms follow a convolution."""
    require_shared()
    model, base = extractor.build(backbones.get("mobilenet_v2"), 96, str(MOBILENET_V2_FILE), "avg", alpha=0.35)
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers)
    x = np.random.default_rng(3).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    want = extractor.compiled_call(model, 96)(x).numpy()
    call = extractor.compiled_call(model, 96, fold=True)
    got = call(x).numpy()
    assert n_bn == 52 and call.python_function.folds == n_bn
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.abs(want).max() > 1  # real statistics: folding changed real numbers, not zeros


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50"])
def test_other_families_fold_all_their_batchnorms(name):
    model, base = extractor.build(backbones.get(name), 64, "none", "avg")
    _randomise_batchnorm(base)
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers)
    x = np.random.default_rng(4).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    f = fold.folded(model)
    assert f.folds == n_bn > 0
    want = model(x, training=False).numpy()
    np.testing.assert_allclose(f(x).numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_backbone_inside_inference_mode_is_folded_too():
    """The fine-tuned model wraps its backbone in InferenceMode: predict folds through the wrapper."""
    base = _mixed_model()
    _randomise_batchnorm(base)
    inputs = keras.Input((12, 12, 4))
    x = layers.InferenceMode(base)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    x = np.random.default_rng(5).normal(size=(4, 12, 12, 4)).astype("float32")
    f = fold.folded(model)
    assert f.folds == 3
    np.testing.assert_allclose(f(x).numpy(), model(x, training=False).numpy(), rtol=1e-5, atol=1e-5)


def test_a_model_that_cannot_be_walked_runs_as_it_is():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization()])
    _randomise_batchnorm(model)
    x = np.random.default_rng(6).normal(size=(2, 8, 8, 3)).astype("float32")
    f = fold.folded(model)
    assert f.folds == 0
    np.testing.assert_array_equal(f(x).numpy(), model(x, training=False).numpy())
