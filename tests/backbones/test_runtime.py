"""RUNTIME=openvino: the same features as TensorFlow's (to float rounding in f32) on real caches, a key of its
own, any batch size, the precision hint explicit, and one-line errors when it cannot run."""

import importlib.util

import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, flowers_subset

import pipeline
from pipeline.backbones import runtime
from pipeline.errors import PipelineError

pytestmark = [pytest.mark.slow, pytest.mark.openvino]

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")

TOLERANCE = 1e-4  # f32: the two runtimes sum in other orders; measured ~1e-5 on features of magnitude ~6


def _caches(tmp_path, per_class=3, **options):
    """The TensorFlow cache and the OpenVINO cache of the same images, loaded."""
    data = flowers_subset(tmp_path / "data", per_class)
    common = {"data": str(data), "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.0, "test_fraction": 0.0,
              "batch": 4, **options}  # 5 classes x per_class images: a last short batch too (dynamic batch)
    tf_path = pipeline.features(**common)
    ov_path = pipeline.features(**common, runtime="openvino")
    return pipeline.load_cache(tf_path), pipeline.load_cache(ov_path)


def _check_same_features(tf_cache, ov_cache):
    assert tf_cache.key != ov_cache.key
    ident_tf, ident_ov = (c.config["identity"] for c in (tf_cache, ov_cache))
    assert "runtime" not in ident_tf and ident_ov["runtime"] == "openvino"  # TensorFlow's key is as it always was
    assert {k: v for k, v in ident_ov.items() if k != "runtime"} == ident_tf
    assert ov_cache.versions.get("openvino") and "openvino" not in tf_cache.versions
    np.testing.assert_array_equal(tf_cache.train.y, ov_cache.train.y)
    assert list(tf_cache.train.paths) == list(ov_cache.train.paths)
    a, b = tf_cache.train.X, ov_cache.train.X
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.abs(a).max() > 1
    assert np.abs(a - b).max() <= TOLERANCE, np.abs(a - b).max()


@needs_openvino
def test_openvino_features_equal_tensorflows_on_a_real_mobilenet_v2_cache(tmp_path):
    tf_cache, ov_cache = _caches(tmp_path, backbone="mobilenet_v2", alpha=0.35, weights=str(MOBILENET_V2_FILE))
    _check_same_features(tf_cache, ov_cache)
    assert ov_cache.config["runtime"] == "openvino" and tf_cache.config["runtime"] == "tensorflow"


@needs_openvino
def test_openvino_features_equal_tensorflows_on_a_real_efficientnet_lite0_cache(tmp_path):
    tf_cache, ov_cache = _caches(tmp_path, per_class=2, backbone="efficientnet_lite0", weights="imagenet")
    _check_same_features(tf_cache, ov_cache)


@needs_openvino
def test_unfolded_graph_gives_the_same_features_and_a_rerun_is_up_to_date(tmp_path, capsys):
    from pipeline.cache import extract
    from pipeline.configs import FeaturesConfig

    opts = {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": str(MOBILENET_V2_FILE), "fold_batchnorm": False}
    tf_cache, ov_cache = _caches(tmp_path, per_class=2, **opts)
    _check_same_features(tf_cache, ov_cache)
    msgs = []
    cfg = FeaturesConfig(data=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), val_fraction=0.0,
                         test_fraction=0.0, batch=4, runtime="openvino", **opts)
    assert extract.run(cfg, log=msgs.append) == ov_cache.path
    assert any(m.startswith("up to date") for m in msgs)


@needs_openvino
def test_the_call_takes_any_batch_size_and_only_uint8_pixels():
    from pipeline.backbones import extractor, registry

    model, _ = extractor.build(registry.get("mobilenet_v2"), 32, str(MOBILENET_V2_FILE), "avg", alpha=0.35)
    tf_call = runtime.prepare(model, 32, "tensorflow", fold=True)
    ov_call = runtime.prepare(model, 32, "openvino", "float32", fold=True)
    assert ov_call.hint == "f32" and ov_call.properties()["INFERENCE_PRECISION_HINT"] == "f32"
    x = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    want = tf_call(x).numpy()
    for n in (7, 1, 3, 7):  # shapes change between calls, back and forth
        got = ov_call(x[:n])
        assert type(got.numpy()) is np.ndarray and got.dtype == np.float32 and got.shape == (n, want.shape[1])
        np.testing.assert_allclose(got.numpy(), want[:n], atol=TOLERANCE, rtol=0)
    first = ov_call(x[:2]).numpy()
    ov_call(x[2:4])
    np.testing.assert_array_equal(first, ov_call(x[:2]).numpy())  # a result is not overwritten by the next call
    with pytest.raises(ValueError, match="uint8"):
        ov_call(x.astype(np.float32))


@needs_openvino
def test_bfloat16_runs_in_bf16_where_the_cpu_has_it_else_is_refused():
    import openvino as ov

    from pipeline.backbones import extractor, registry

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    model, _ = extractor.build(registry.get("mobilenet_v2"), 32, str(MOBILENET_V2_FILE), "avg", alpha=0.35)
    if "BF16" not in caps:
        with pytest.raises(PipelineError, match="PRECISION=bfloat16 with RUNTIME=openvino: this CPU has no BF16"):
            runtime.prepare(model, 32, "openvino", "bfloat16")
        return
    call = runtime.prepare(model, 32, "openvino", "bfloat16")
    assert call.hint == "bf16" and call.properties()["INFERENCE_PRECISION_HINT"] == "bf16"
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a, b = runtime.prepare(model, 32, "tensorflow")(x).numpy(), call(x).numpy()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert b.dtype == np.float32 and cos.min() > 0.99 and np.abs(a - b).max() > TOLERANCE  # really bf16


class _Core:
    def __init__(self, caps):
        self.caps = caps

    def get_property(self, device, name):
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.caps


def test_precision_hints_are_explicit_and_need_the_cpu_capability():
    assert runtime.openvino_hint("float32", core=_Core([])) == "f32"  # always set: OpenVINO's default may be bf16
    assert runtime.openvino_hint("bfloat16", core=_Core(["FP32", "BF16"])) == "bf16"
    with pytest.raises(PipelineError, match=r"^PRECISION=bfloat16 with RUNTIME=openvino: this CPU has no BF16 "
                                            r"\(OpenVINO lists FP32, INT8\); use PRECISION=float32$"):
        runtime.openvino_hint("bfloat16", core=_Core(["FP32", "INT8"]))
    with pytest.raises(PipelineError, match="no FP16"):
        runtime.openvino_hint("float16", core=_Core(["FP32", "BF16"]))
    assert runtime.keras_precision("openvino", "bfloat16") == "float32"
    assert runtime.keras_precision("tensorflow", "bfloat16") == "bfloat16"


def test_missing_openvino_and_unknown_runtimes_fail_in_one_line(tmp_path, monkeypatch, capsys):
    from conftest import make_tree

    from pipeline import cli

    data = make_tree(tmp_path / "data", per_class=3)
    args = ["features", f"DATA={data}", "BACKBONE=mobilenet_v2", "ALPHA=0.35", "WEIGHTS=none", "SIZE=32",
            f"CACHE_DIR={tmp_path / 'cache'}"]
    assert cli.main([*args, "RUNTIME=onnx"]) == 2
    assert "unknown runtime 'onnx'; valid: openvino, tensorflow" in capsys.readouterr().err
    assert cli.main([*args, "RUNTIME=openvino", "ENGINE=ray"]) == 2
    if importlib.util.find_spec("openvino") is not None:
        assert "RUNTIME=openvino runs in this process only (ENGINE=inprocess)" in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name, *a))
    capsys.readouterr()
    assert cli.main([*args, "RUNTIME=openvino"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RUNTIME=openvino needs openvino, not installed: pip install " \
                                          "'pipeline[openvino]'" in err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.h5*"))  # before any work
