"""POOLING=gem: the layer equals a numpy reference, survives save/load, folds and converts to OpenVINO with the
same features, has cache keys of its own (GEM_P in the key only for gem), and a head on a gem cache predicts
from raw images what it predicts on the cached features."""

import importlib.util
import json
import os

import keras
import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, flowers_subset, make_tree

import pipeline
from pipeline import cli
from pipeline.backbones import extractor, fold, layers
from pipeline.backbones import registry as backbones
from pipeline.errors import PipelineError

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")


def gem_reference(x, p, eps=layers.GEM_EPS):
    """GeM written out in numpy, float64: per image and channel, mean over H, W of max(x, eps)^p, then ^(1/p)."""
    x = np.maximum(np.asarray(x, np.float64), eps)
    return np.mean(x ** p, axis=(1, 2)) ** (1.0 / p)


@pytest.mark.parametrize("p", [1.0, 3.0, 4.5])
def test_gem_equals_the_numpy_reference_on_a_tiny_feature_map(p):
    x = np.random.default_rng(0).normal(1.0, 1.5, (2, 3, 4, 5)).astype(np.float32)  # negatives: clamped at eps
    out = keras.ops.convert_to_numpy(layers.GeneralizedMeanPooling2D(p=p)(x))
    assert out.shape == (2, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out, gem_reference(x, p), rtol=1e-5, atol=1e-6)
    if p == 1.0:  # p = 1 is average pooling of the clamped map
        np.testing.assert_allclose(out, np.maximum(x, layers.GEM_EPS).mean(axis=(1, 2)), rtol=1e-5)


def test_gem_saves_and_loads_with_its_exponent(tmp_path):
    x = np.random.default_rng(1).uniform(0, 6, (2, 3, 3, 4)).astype(np.float32)
    inputs = keras.Input((3, 3, 4))
    model = keras.Model(inputs, layers.GeneralizedMeanPooling2D(p=2.5, name="gem_pool")(inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")  # safe_mode: a registered layer, no lambda
    assert loaded.get_layer("gem_pool").p == 2.5
    np.testing.assert_allclose(loaded(x).numpy(), gem_reference(x, 2.5), rtol=1e-5)


def test_a_bad_exponent_is_one_line():
    with pytest.raises(PipelineError, match=r"^GEM_P=0: the generalised-mean exponent must be a finite number"):
        layers.GeneralizedMeanPooling2D(p=0)


@pytest.mark.slow
def test_a_real_backbone_with_gem_folds_and_pools_its_last_feature_map():
    spec = backbones.get("mobilenet_v2")
    model, base = extractor.build(spec, 64, str(MOBILENET_V2_FILE), "gem", alpha=0.35, gem_p=3.0)
    assert model.output_shape == (None, 1280) and model.get_layer("gem_pool").p == 3.0
    x = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    fmap = keras.Model(model.inputs[0], model.get_layer("gem_pool").input)(x).numpy()  # the backbone's last map
    want = gem_reference(fmap, 3.0)
    np.testing.assert_allclose(model(x).numpy(), want, rtol=1e-4, atol=1e-5)
    call = fold.folded(model)
    assert call.folds > 0
    np.testing.assert_allclose(call(x).numpy(), want, rtol=1e-4, atol=1e-4)


def _features(tmp_path, data, **options):
    return pipeline.features(data=str(data), cache_dir=str(tmp_path / "cache"), backbone="mobilenet_v2", alpha=0.35,
                             weights=str(MOBILENET_V2_FILE), size=64, val_fraction=0.0, test_fraction=0.0, batch=4,
                             **options)


@pytest.mark.slow
def test_gem_has_a_cache_key_of_its_own_and_gem_p_enters_it_only_with_gem(tmp_path):
    data = make_tree(tmp_path / "data", per_class=3)
    paths = {(pool, p): _features(tmp_path, data, pooling=pool, gem_p=p)
             for pool, p in (("avg", 3.0), ("avg", 2.0), ("gem", 3.0), ("gem", 2.0))}
    keys = {k: pipeline.load_cache(v).key for k, v in paths.items()}
    idents = {k: pipeline.load_cache(v).config["identity"] for k, v in paths.items()}
    assert keys[("avg", 3.0)] == keys[("avg", 2.0)] and "gem_p" not in idents[("avg", 3.0)]  # avg's key as it was
    assert len({keys[("avg", 3.0)], keys[("gem", 3.0)], keys[("gem", 2.0)]}) == 3
    assert idents[("gem", 2.0)]["gem_p"] == 2.0 and idents[("gem", 3.0)]["pooling"] == "gem"
    assert os.path.basename(paths[("gem", 2.0)]).startswith("data_mobilenet_v2_64_gem_")
    a, b = (pipeline.load_cache(paths[("gem", p)]).train.X for p in (3.0, 2.0))
    assert np.abs(a).max() > 0.1 and not np.allclose(a, b)
    with pytest.raises(PipelineError, match=r"^GEM_P=-1: "):
        _features(tmp_path, data, pooling="gem", gem_p=-1.0)


@pytest.mark.slow
@pytest.mark.openvino
@needs_openvino
def test_gem_through_openvino_equals_tensorflow(tmp_path):
    data = flowers_subset(tmp_path / "data", 2)
    common = {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": str(MOBILENET_V2_FILE), "size": 64,
              "pooling": "gem", "gem_p": 3.0}
    tf_cache = pipeline.load_cache(_features_of(tmp_path, data, **common))
    ov_cache = pipeline.load_cache(_features_of(tmp_path, data, runtime="openvino", **common))
    assert ov_cache.config["identity"]["gem_p"] == 3.0 and tf_cache.key != ov_cache.key
    a, b = tf_cache.train.X, ov_cache.train.X
    assert a.shape == b.shape == (10, 1280) and np.abs(a).max() > 1
    assert np.abs(a - b).max() <= 1e-4, np.abs(a - b).max()


def _features_of(tmp_path, data, **options):
    return pipeline.features(data=str(data), cache_dir=str(tmp_path / "cache"), val_fraction=0.0,
                             test_fraction=0.0, batch=4, **options)


@pytest.mark.slow
def test_a_head_on_a_gem_cache_predicts_from_raw_images_what_it_predicts_on_the_cache(tmp_path, capsys):
    from pipeline.cache import store
    from pipeline.heads import artifacts
    from pipeline.heads import registry as heads

    data = flowers_subset(tmp_path / "data", 4)
    opts = [f"DATA={data}", "BACKBONE=mobilenet_v2", "ALPHA=0.35", f"WEIGHTS={MOBILENET_V2_FILE}", "SIZE=64",
            "POOLING=gem", "GEM_P=2.5", f"CACHE_DIR={tmp_path / 'cache'}", f"MODELS_DIR={tmp_path / 'models'}",
            f"REPORTS_DIR={tmp_path / 'reports'}", "VAL_FRACTION=0.25", "TEST_FRACTION=0.25"]
    assert cli.main(["head", *opts, "HEAD=logreg"]) == 0, capsys.readouterr().err
    rec = next(str(p) for p in (tmp_path / "models").rglob("logreg.json"))
    cache = store.load(json.loads(open(rec).read())["cache_path"])
    assert cache.config["identity"]["gem_p"] == 2.5
    files = [os.path.join(cache.config["source_root"], p) for p in cache.test.paths]
    want = heads.scores(artifacts.load_head(rec), cache.test.features)
    out = tmp_path / "preds.json"
    assert cli.main(["predict", *files, f"MODEL={rec}", "TOP_K=5", f"OUTPUT={out}"]) == 0, capsys.readouterr().err
    names = cache.class_names
    for p, row in zip(json.loads(out.read_text())["predictions"], want):
        got = {t["label"]: t["probability"] for t in p["top"]}
        np.testing.assert_allclose([got[n] for n in names], row, atol=1e-5)
