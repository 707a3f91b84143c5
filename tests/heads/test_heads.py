"""The head registry: every head fits and predicts, parameters parse to their types, the dense head is a
proper scikit-learn estimator and reproducible, and the cache is faithful to the backbone in the loop."""

import dataclasses

import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, flowers_subset
from sklearn.base import clone
from synthetic import write_cache

from pipeline.cache import store
from pipeline.errors import PipelineError
from pipeline.heads import dense
from pipeline.heads import registry as heads

FAST_DENSE = {"epochs": 15, "patience": 3, "learning_rate": 0.02}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return store.load(write_cache(tmp_path_factory.mktemp("c") / "blobs.h5", dim=16, sep=3.0, seed=1))


def fast(name):
    return FAST_DENSE if name == "dense" else {}


@pytest.mark.parametrize("name", list(heads.HEADS))
def test_every_head_fits_and_predicts(blobs, name):
    tr, te = blobs.splits["train"], blobs.splits["test"]
    est = heads.build(name, fast(name), seed=0).fit(tr.features, tr.labels)
    pred = est.predict(te.features)
    assert pred.shape == te.labels.shape and set(pred) <= {0, 1, 2}
    assert (pred == te.labels).mean() >= 0.8  # well-separated blobs: a working head gets them
    s = heads.scores(est, te.features)
    assert s.shape == (len(te.labels), 3)
    assert (np.argmax(s, 1) == pred).mean() >= 0.95  # ranking agrees with the predictions
    assert list(est.classes_) == [0, 1, 2]


def test_registry_entries_are_complete():
    for name, h in heads.HEADS.items():
        assert h.name == name and h.kind in ("sklearn", "keras") and h.params and h.grid
        assert set(h.grid) <= set(h.params)
        est = h.build(seed=3)
        valid = est.get_params(deep=True)
        assert all(p.target in valid for p in h.params.values()), name
        assert all(len(v) >= 2 for v in h.grid.values())
        assert ("class_weight" in h.params) == h.class_weights


def test_parameter_names_do_not_shadow_step_options():
    from pipeline.configs import HeadConfig

    options = {f.name for f in dataclasses.fields(HeadConfig)}
    for h in heads.HEADS.values():
        assert not options & set(h.params), h.name


def test_parameters_parse_to_declared_types():
    dense = heads.get("dense")
    v = dense.resolve({"HIDDEN": "1024,512", "DROPOUT": "0.5", "CLASS_WEIGHT": "balanced", "epochs": "7"})
    assert v["hidden"] == (1024, 512) and v["dropout"] == 0.5 and v["class_weight"] == "balanced"
    assert v["epochs"] == 7 and isinstance(v["epochs"], int)
    assert dense.resolve({"HIDDEN": "none"})["hidden"] == ()
    est = heads.build("logreg", {"C": "0.1", "CLASS_WEIGHT": "balanced"})
    assert est.get_params()["clf__C"] == 0.1 and est.get_params()["clf__class_weight"] == "balanced"
    rf = heads.build("random_forest", {"MAX_DEPTH": "none", "N_ESTIMATORS": "7"})
    assert rf.get_params()["clf__max_depth"] is None and rf.get_params()["clf__n_estimators"] == 7
    assert heads.build("svm", {"C": "10"}).get_params()["clf__C"] == 10.0


@pytest.mark.parametrize("name,params,msg", [
    ("knn", {"C": "1"}, "head 'knn' has no parameter 'C'; valid: N_NEIGHBORS, VOTE"),
    ("logreg", {"C": "big"}, "C='big': expected float"),
    ("dense", {"HIDDEN": "12,x"}, "HIDDEN='12,x': expected comma list of ints"),
    ("dense", {"CLASS_WEIGHT": "heavy"}, "CLASS_WEIGHT='heavy': expected balanced | none"),
])
def test_bad_parameters_are_errors(name, params, msg):
    with pytest.raises(PipelineError, match=msg.replace("(", r"\(").replace("|", r"\|")):
        heads.build(name, params)


def test_unknown_head_lists_valid_ones():
    with pytest.raises(PipelineError, match="unknown head 'xgb'; valid: dense, knn, linear_svm, logreg, mlp"):
        heads.get("xgb")


def test_dense_head_follows_sklearn_conventions(blobs):
    h = dense.DenseHead(hidden=(8,), dropout=0.1, epochs=10, learning_rate=0.02, seed=4)
    assert h.get_params()["hidden"] == (8,) and not hasattr(h, "model_")
    c = clone(h)
    assert c.get_params() == h.get_params() and c is not h
    tr = blobs.splits["train"]
    h.fit(tr.features, tr.labels, validation_data=(blobs.splits["val"].features, blobs.splits["val"].labels))
    assert hasattr(h, "model_") and not hasattr(clone(h), "model_")
    assert h.n_features_in_ == 16
    m = h.model_
    assert m.input_shape == (None, 16) and m.output_shape == (None, 3)
    assert [l.name for l in m.layers] == ["features", "head_dropout_1", "head_dense_1", "head_dropout_2",
                                         "head_output"]
    p = h.predict_proba(blobs.splits["test"].features)
    assert np.allclose(p.sum(1), 1, atol=1e-5)


def test_dense_two_classes_is_one_sigmoid_unit(tmp_path):
    c = store.load(write_cache(tmp_path / "two.h5", class_names=("cat", "dog"), dim=8, seed=2))
    tr = c.splits["train"]
    h = heads.build("dense", FAST_DENSE).fit(tr.features, tr.labels)
    assert h.model_.output_shape == (None, 1)
    assert h.model_.get_layer("head_output").activation.__name__ == "sigmoid"
    p = h.predict_proba(c.splits["test"].features)
    assert p.shape == (len(c.splits["test"].labels), 2) and np.allclose(p.sum(1), 1)
    assert (h.predict(c.splits["test"].features) == c.splits["test"].labels).mean() >= 0.8


def test_dense_early_stopping_restores_best_weights(tmp_path):
    # overlapping classes, many dimensions, few rows: the head overfits and the val loss turns up
    c = store.load(write_cache(tmp_path / "noisy.h5", dim=64, sep=0.3, seed=4,
                               counts={"train": 15, "val": 15, "test": 2}))
    tr, va = c.splits["train"], c.splits["val"]
    h = dense.DenseHead(hidden=(64,), epochs=60, patience=3, learning_rate=0.01, dropout=0.0, seed=0)
    h.fit(tr.features, tr.labels, validation_data=(va.features, va.labels))
    val_loss = h.history_["val_loss"]
    assert len(val_loss) < 60  # stopped early
    best = int(np.argmin(val_loss))
    assert best < len(val_loss) - 1  # the last epoch was not the best: restoring matters
    now = h.model_.evaluate(va.features, va.labels, verbose=0)[0]
    assert now == pytest.approx(val_loss[best], rel=1e-4)
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(h.history_)


@pytest.mark.slow
def test_same_seed_same_predictions_other_seed_differs(blobs):
    tr, te = blobs.splits["train"], blobs.splits["test"]
    for name in ("dense", "mlp", "random_forest"):
        a = heads.scores(heads.build(name, fast(name), seed=5).fit(tr.features, tr.labels), te.features)
        b = heads.scores(heads.build(name, fast(name), seed=5).fit(tr.features, tr.labels), te.features)
        c = heads.scores(heads.build(name, fast(name), seed=6).fit(tr.features, tr.labels), te.features)
        assert np.array_equal(a, b), name
        assert not np.array_equal(a, c), name


def test_class_weights_reach_the_estimators(tmp_path):
    c = store.load(write_cache(tmp_path / "skew.h5", counts={"train": [40, 10, 5], "val": 5, "test": 5},
                               seed=3))
    y = c.splits["train"].labels
    w = dense.keras_class_weight("balanced", y, 3)
    assert w == pytest.approx({0: 55 / 120, 1: 55 / 30, 2: 55 / 15})
    assert dense.keras_class_weight(None, y, 3) is None
    for name in ("logreg", "linear_svm", "svm", "random_forest", "dense"):
        est = heads.build(name, {"CLASS_WEIGHT": "balanced"})
        key = "class_weight" if name == "dense" else "clf__class_weight"
        assert est.get_params()[key] == "balanced"


@pytest.mark.slow
def test_cache_is_faithful_to_the_backbone_in_the_loop(tmp_path):
    """A dense head on cached features == the same head trained end to end with the frozen backbone in
    the loop: same images and order, no augmentation, same seed and batches."""
    import keras

    from pipeline.cache import extract as features
    from pipeline.configs import FeaturesConfig
    from pipeline.data import loading

    data = flowers_subset(tmp_path / "flowers", per_class=24)
    fcfg = FeaturesConfig(data=str(data), backbone="mobilenet_v2", alpha=0.35, weights=str(MOBILENET_V2_FILE),
                          size=96, batch=16, cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                          test_fraction=0.2)
    cache = store.load(features.run(fcfg, log=lambda m: None))
    plan = features.Plan(fcfg, log=lambda m: None)
    ds, size = plan.ds, plan.size
    assert cache.key == plan.key
    idx = {s: ds.split(s) for s in ("train", "val", "test")}
    for s in idx:  # the cache holds the splits in the same order as the image pipeline feeds them
        assert list(cache.splits[s].paths) == [ds.items[i].relpath for i in idx[s]]

    hp = dict(hidden=(), dropout=0.2, learning_rate=1e-3, epochs=25, batch_size=16, patience=4)
    cached = dense.DenseHead(**hp, shuffle=False, seed=7)
    tr, va, te = (cache.splits[s] for s in ("train", "val", "test"))
    cached.fit(tr.features, tr.labels, validation_data=(va.features, va.labels))

    keras.utils.set_random_seed(7)  # as DenseHead.fit does, then the same head model
    head = dense.build_model(plan.dim, len(cache.class_names), hp["hidden"], hp["dropout"])
    pixels = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    e2e = keras.Model(pixels, head(plan.model(pixels)))
    dense.compile_model(e2e, hp["learning_rate"])
    assert len(e2e.trainable_weights) == len(head.trainable_weights) == 2  # the backbone is frozen
    feed = {s: loading.dataset(ds, idx[s], size, fcfg.interpolation, hp["batch_size"], labels=True) for s in idx}
    hist = e2e.fit(feed["train"], validation_data=feed["val"], epochs=hp["epochs"], verbose=0,
                   shuffle=False, callbacks=[dense.early_stopping(hp["patience"])])

    assert len(hist.history["loss"]) == len(cached.history_["loss"])
    assert np.allclose(hist.history["val_loss"], cached.history_["val_loss"], atol=1e-3)
    for a, b in zip(head.get_weights(), cached.model_.get_weights()):
        assert np.allclose(a, b, atol=1e-3), np.abs(a - b).max()
    p_e2e = e2e.predict(feed["test"], verbose=0)
    p_cached = cached.predict_proba(te.features)
    diff = np.abs(p_e2e - p_cached).max()
    acc_e2e = (np.argmax(p_e2e, 1) == te.labels).mean()
    acc_cached = (cached.predict(te.features) == te.labels).mean()
    print(f"faithfulness: max |p_e2e - p_cached| = {diff:.2e} over {len(te.labels)} test images; accuracy "
          f"{acc_cached:.3f} cached vs {acc_e2e:.3f} end to end; {len(hist.history['loss'])} epochs")
    assert diff < 1e-3
    assert abs(acc_e2e - acc_cached) <= 0.01
    assert acc_cached > 0.5  # real ImageNet features on five flower classes: far above chance (0.2)
