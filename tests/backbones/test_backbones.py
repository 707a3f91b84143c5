"""The backbone registry and the frozen extractor built from it (weights=None: pure shape tests)."""

import dataclasses
import warnings

import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE

from pipeline.backbones import extractor, layers
from pipeline.backbones import registry as backbones
from pipeline.errors import PipelineError


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_every_backbone_builds_and_pools_to_its_feature_size(name):
    spec = backbones.get(name)
    size = max(spec.min_size, 32)
    model, base = extractor.build(spec, size, "none", "avg")
    assert model.output_shape == (None, spec.features)
    assert not base.trainable
    x = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    out = extractor.compiled_call(model, size)(x).numpy()  # one traced call: cheaper than predict's machinery
    assert out.shape == (2, spec.features) and np.isfinite(out).all()


@pytest.mark.slow
def test_pooling_modes_and_alpha():
    spec = backbones.get("mobilenet")
    avg, _ = extractor.build(spec, 64, "none", "avg", alpha=0.25)
    flat, _ = extractor.build(spec, 64, "none", "flatten", alpha=0.25)
    mx, _ = extractor.build(spec, 64, "none", "max", alpha=0.25)
    assert avg.output_shape == (None, 256) and mx.output_shape == (None, 256)
    assert flat.output_shape == (None, 2 * 2 * 256)


@pytest.mark.parametrize("precision,compute", [("bfloat16", "bfloat16"), ("float16", "float16")])
def test_mixed_precision_computes_in_it_and_gives_float32_features_close_to_float32(precision, compute):
    import keras
    from conftest import MOBILENET_V2_FILE  # real weights: random ones give features near 0 (float16 underflow)

    from pipeline.backbones import fold

    spec, w = backbones.get("mobilenet_v2"), str(MOBILENET_V2_FILE)
    ref, _ = extractor.build(spec, 64, w, "avg", alpha=0.35)
    model, base = extractor.build(spec, 64, w, "avg", alpha=0.35, precision=precision)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    assert {layer.compute_dtype for layer in base.layers if isinstance(layer, keras.layers.Conv2D)} == {compute}
    assert all(w.dtype == "float32" for w in base.weights)  # weights kept in float32
    x = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    want, got = ref(x, training=False).numpy(), extractor.compiled_call(model, 64, fold=True)(x).numpy()
    assert got.dtype == np.float32 and fold.folded(model).folds == 0  # no folding in reduced precision
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.99 and not np.array_equal(got, want)  # close, yet computed differently


def test_unknown_precision_lists_the_valid_ones():
    with pytest.raises(PipelineError, match="unknown precision 'int8'; valid: bfloat16, float16, float32"):
        extractor.build(backbones.get("mobilenet"), 32, "none", "avg", precision="int8")


def test_random_weights_are_seeded():
    spec = backbones.get("mobilenet_v2")
    a = backbones.weights_digest(backbones.build_base(spec, 32, "none", alpha=0.35, seed=1))
    b = backbones.weights_digest(backbones.build_base(spec, 32, "none", alpha=0.35, seed=1))
    c = backbones.weights_digest(backbones.build_base(spec, 32, "none", alpha=0.35, seed=2))
    assert a == b != c


@pytest.mark.parametrize("mode,pixel,expected", [
    ("tf", 255.0, [1.0, 1.0, 1.0]),
    ("caffe", 0.0, [-103.939, -116.779, -123.68]),
    ("torch", 0.0, [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]),
    ("lite0", 127.0, [0.0, 0.0, 0.0]),
    ("none", 7.0, [7.0, 7.0, 7.0]),
])
def test_preprocess_modes_match_keras_and_leave_input_alone(mode, pixel, expected):
    x = np.full((1, 2, 2, 3), pixel, np.float32)
    out = np.asarray(layers.Preprocess(mode)(x))
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-5, atol=1e-4)
    assert (x == pixel).all()


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(PipelineError, match="unknown backbone 'resnet9'.*mobilenet_v2.*vgg16"):
        backbones.get("resnet9")
    with pytest.raises(PipelineError, match="unknown pooling 'mean'; valid: avg, flatten, gem, max"):
        extractor.build(backbones.get("mobilenet"), 32, "none", "mean")


def test_size_below_minimum_is_a_clear_error():
    with pytest.raises(PipelineError, match="SIZE=64 is below xception's minimum input size 71"):
        backbones.resolve_size(backbones.get("xception"), 64)
    assert backbones.resolve_size(backbones.get("xception"), 0) == 299


@pytest.mark.slow
def test_imagenet_weights_offline_and_not_cached_name_the_file():
    with pytest.raises(PipelineError) as e:
        backbones.build_base(backbones.get("mobilenet_v2"), 96, "imagenet")
    msg = str(e.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5" in msg
    assert "models" in msg and "\n" not in msg


def test_mobilenet_at_another_size_uses_the_cached_default_size_weights():
    spec = backbones.get("mobilenet")  # conftest links only mobilenet_2_5_224_tf_no_top.h5 into KERAS_HOME
    reference = backbones.build_base(spec, 224, "imagenet", alpha=0.25)
    with pytest.warns(UserWarning, match="mobilenet_2_5_128_tf_no_top.h5 is not cached"):
        model = backbones.build_base(spec, 128, "imagenet", alpha=0.25)
    assert model.input_shape == (None, 128, 128, 3)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="no such file"):
        backbones.build_base(backbones.get("mobilenet_v2"), 96, str(tmp_path / "nope.h5"))


def test_alpha_on_a_family_without_it_is_an_error():
    with pytest.raises(PipelineError, match="ALPHA is not an option of vgg16"):
        backbones.build_base(backbones.get("vgg16"), 32, "none", alpha=0.5)


# --- option values checked against the registry; Keras' refusals and warnings as one line ------------------

@pytest.mark.parametrize("name, imagenet", [("mobilenet", "0.25, 0.5, 0.75, 1.0"),
                                            ("mobilenet_v2", "0.35, 0.5, 0.75, 1.0, 1.3, 1.4"),
                                            ("mobilenet_v3_small", "0.75, 1.0"), ("mobilenet_v3_large", "0.75, 1.0")])
def test_alpha_is_checked_against_the_family_before_anything_is_built(name, imagenet):
    spec = backbones.get(name)
    with pytest.raises(PipelineError, match=f"^ALPHA=0.33: {name} has ImageNet weights for ALPHA={imagenet} only"):
        backbones.check_options(spec, 0, "imagenet", 0.33)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(PipelineError, match=r"^ALPHA=-?(1|nan|inf): the width multiplier must be above 0"):
            backbones.check_options(spec, 0, "none", bad)
    assert backbones.check_options(spec, 0, "none", 0.33) == 224  # random weights: any width above the minimum


def test_mobilenet_narrower_than_one_channel_is_refused_before_keras_is_asked():
    with pytest.raises(PipelineError, match=r"^ALPHA=0.01: too narrow for mobilenet .* use ALPHA>=0.03125"):
        backbones.build_base(backbones.get("mobilenet"), 32, "none", alpha=0.01)
    assert backbones.build_base(backbones.get("mobilenet"), 32, "none", alpha=1 / 32).output_shape[-1] == 32


def test_a_value_keras_refuses_is_one_line_naming_the_options_and_the_valid_values():
    spec = dataclasses.replace(backbones.get("mobilenet"), min_alpha=0.0)  # the registry's guard left out
    with pytest.raises(PipelineError) as e:
        backbones.build_base(spec, 32, "none", alpha=0.01)  # Keras: a Conv2D with 0 filters
    msg = str(e.value)
    assert msg.startswith("mobilenet refuses SIZE=32, ALPHA=0.01, WEIGHTS=none (Keras: ") and "filters" in msg
    assert msg.endswith("valid: SIZE>=32, ALPHA>0; WEIGHTS=imagenet, none or a weights file") and "\n" not in msg


def test_an_error_that_is_not_a_refused_value_keeps_its_traceback():
    spec = dataclasses.replace(backbones.get("vgg16"), alpha=1.0)  # a registry bug: VGG16 takes no alpha
    with pytest.raises(TypeError, match="alpha"):
        backbones.build_base(spec, 32, "none")


@pytest.mark.slow
def test_a_failed_build_drops_keras_warnings_and_says_one_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(PipelineError) as e:  # a 0.35 file for alpha 0.33: "Skipping nested container"
            backbones.build_base(backbones.get("mobilenet_v2"), 224, str(MOBILENET_V2_FILE), alpha=0.33)
        assert str(e.value).startswith(f"WEIGHTS={MOBILENET_V2_FILE} does not fit mobilenet_v2 with SIZE=224, "
                                       "ALPHA=0.33 (Keras: ") and "\n" not in str(e.value)
        with pytest.raises(PipelineError, match="not in the Keras cache"):  # offline, at a size Keras warns about
            backbones.build_base(backbones.get("mobilenet_v3_small"), 96, "imagenet")
    assert [str(w.message) for w in caught] == []


@pytest.mark.slow
def test_a_build_at_a_size_without_its_own_file_is_quiet_and_loads_the_default_sizes_weights():
    spec = backbones.get("mobilenet")  # 96: Keras loads the cached 224 file itself, warning "input_shape ..."
    reference = backbones.build_base(spec, 224, "imagenet", alpha=0.25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = backbones.build_base(spec, 96, "imagenet", alpha=0.25)
    assert [str(w.message) for w in caught] == []
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
