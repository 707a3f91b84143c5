"""TTA=1: a horizontally flipped row of every val and test image cached beside its clean row (groups val_tta,
test_tta), in the key only when on; heads report the accuracy of scores averaged over both rows."""

import json

import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, flowers_subset, make_tree

import pipeline
from pipeline.cache import engine, extract, store
from pipeline.cache.plan import Plan
from pipeline.configs import FeaturesConfig

pytestmark = pytest.mark.slow

KEY_FIELDS = {"manifest", "backbone", "weights", "size", "alpha", "interpolation", "preprocessing", "pooling",
              "dtype", "precision", "fold_batchnorm", "extract_version"}  # the identity before TTA existed


def opts(root, **kw):
    return {"data": str(root / "data"), "backbone": "mobilenet_v2", "alpha": 0.35, "weights": str(MOBILENET_V2_FILE),
            "size": 64, "tta": True, "batch": 4, "chunk": 8, "val_fraction": 0.25, "test_fraction": 0.25,
            "cache_dir": str(root / "cache"), **kw}


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    flowers_subset(root / "data", per_class=4)
    return root


@pytest.fixture(scope="module")
def tta_cache(flowers):
    return pipeline.features(**opts(flowers))


def test_flipped_rows_are_the_backbone_on_the_mirrored_images(flowers, tta_cache):
    c = pipeline.load_cache(tta_cache)
    with store.h5py.File(tta_cache) as f:
        assert set(f) == {"train", "val", "test", "val_tta", "test_tta"}  # train has none
    plan = Plan(FeaturesConfig(**opts(flowers)), log=lambda m: None)
    call = engine.prepare(plan)  # the very call extraction runs
    for s in ("val", "test"):
        clean, flipped = c.splits[s], c.tta[s]
        assert flipped.X.shape == clean.X.shape and list(flipped.paths) == list(clean.paths)
        assert np.array_equal(flipped.y, clean.y)
        idx = plan.ds.split(s)[:2]
        x = np.stack([plan.ds.load(i, plan.size, plan.cfg.interpolation) for i in idx])
        np.testing.assert_allclose(flipped.X[:2], call(np.flip(x, axis=2)).numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(clean.X[:2], call(x).numpy(), rtol=0, atol=1e-5)
        assert not np.isclose(flipped.X, clean.X, atol=1e-3).all(axis=1).any()  # a photo is not its mirror


def test_the_key_has_tta_only_when_on(flowers):
    def plan(**kw):
        return Plan(FeaturesConfig(**opts(flowers, **kw)), log=lambda m: None, lazy=True)

    off, on = plan(tta=False), plan()
    assert set(off.identity) == KEY_FIELDS  # off: the key every cache had before TTA
    assert on.identity["tta"] == "horizontal_flip" and on.key != off.key
    c = pipeline.load_cache(pipeline.features(**opts(flowers, tta=False)))
    assert c.tta == {}
    with store.h5py.File(c.path) as f:
        assert set(f) == {"train", "val", "test"}


def test_a_test_image_that_does_not_decode_is_skipped_in_its_tta_group_too(tmp_path):
    make_tree(tmp_path / "data", per_class=8)
    plan = Plan(FeaturesConfig(**opts(tmp_path, weights="none", size=32)), log=lambda m: None)
    victim = tmp_path / "data" / plan.ds.items[plan.ds.split("test")[0]].relpath
    victim.write_bytes(victim.read_bytes()[:300])  # cut short after the scan: its pixels fail at extraction
    c = pipeline.load_cache(extract.ensure(plan))
    rel = str(victim.relative_to(tmp_path / "data"))
    assert rel not in c.test.paths and list(c.tta["test"].paths) == list(c.test.paths)
    with store.h5py.File(c.path) as f:
        assert f["test"]["skipped"][()].sum() == 1
        assert np.array_equal(f["test_tta"]["skipped"][()], f["test"]["skipped"][()])


@pytest.mark.parametrize("head", ["logreg", "linear_svm"])
def test_a_head_reports_test_accuracy_with_tta(flowers, tta_cache, head, capsys):
    from pipeline import cli
    from pipeline.heads import artifacts

    argv = ["head", f"HEAD={head}", f"CACHE={tta_cache}", f"MODELS_DIR={flowers / 'models'}",
            f"REPORTS_DIR={flowers / 'reports'}"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    c = pipeline.load_cache(tta_cache)
    m = json.loads(next((flowers / "reports").glob(f"*/{head}/metrics.json")).read_text())
    est, _ = artifacts.load(artifacts.record_path(str(flowers / "models"), tta_cache, head))
    for s in ("val", "test"):
        if head == "logreg":  # probabilities averaged over the clean and the flipped row
            p = est.predict_proba(c.splits[s].X) + est.predict_proba(c.tta[s].X)
        else:  # no probabilities: decision values averaged
            p = est.decision_function(c.splits[s].X) + est.decision_function(c.tta[s].X)
        acc = float(np.mean(est.classes_[np.argmax(p, axis=1)] == c.splits[s].y))
        assert m["tta"][s]["accuracy"] == pytest.approx(acc) and m["tta"][s]["n"] == len(c.splits[s].y)
    assert f"test accuracy {m['test']['accuracy']:.4f}, with TTA (flip) {m['tta']['test']['accuracy']:.4f}" in out
    assert f"with TTA (flip) {m['tta']['val']['accuracy']:.4f}" in out


def test_a_run_killed_among_the_tta_rows_resumes_to_the_same_cache(tmp_path):
    from interrupt import kill_when, resumed_and_clean

    make_tree(tmp_path / "data", per_class=60, size=(48, 48))
    args = ["features", f"DATA={tmp_path / 'data'}", "BACKBONE=mobilenet_v2", "WEIGHTS=none", "ALPHA=0.35",
            "SIZE=96", "BATCH=2", "CHUNK=4", "VAL_FRACTION=0.4", "TEST_FRACTION=0.4", "TTA=1"]
    kill_when(args, tmp_path / "killed", lambda f: "val_tta" in f and int(f["val_tta"].attrs["done"]) >= 4)
    a, b = resumed_and_clean(args, tmp_path / "killed", tmp_path / "clean")
    for s in ("val", "test"):
        assert a.tta[s].X.tobytes() == b.tta[s].X.tobytes() and list(a.tta[s].paths) == list(b.tta[s].paths)
        assert getattr(a, s).X.tobytes() == getattr(b, s).X.tobytes()
