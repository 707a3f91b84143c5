"""Saved heads: reload and predict identically; a tampered file, another cache's record or other versions
are refused before anything is unpickled or loaded."""

import json
import os

import joblib
import numpy as np
import pytest
from synthetic import write_cache

from pipeline import records
from pipeline.cache import store
from pipeline.errors import PipelineError
from pipeline.heads import artifacts, dense
from pipeline.heads import registry as heads


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return store.load(write_cache(tmp_path_factory.mktemp("c") / "blobs.h5", dim=12, sep=2.0, seed=5))


def fit_and_save(cache, models, name):
    params = heads.get(name).resolve({"EPOCHS": "8"} if name == "dense" else {})
    est = heads.build(name, params, seed=1)
    tr = cache.splits["train"]
    est.fit(tr.features, tr.labels)
    rec = artifacts.save(est, name=name, head=name, params=params, cache=cache, config={"head": name},
                         metrics={"test": {"accuracy": 1.0}}, models_dir=str(models),
                         history=getattr(est, "history_", None))
    return est, rec


@pytest.mark.parametrize("name", ["logreg", "svm", "random_forest", "dense"])
def test_saved_head_reloads_and_predicts_identically(cache, tmp_path, name):
    est, rec_path = fit_and_save(cache, tmp_path / "models", name)
    assert rec_path == str(tmp_path / "models" / "blobs" / f"{name}.json")
    folder = os.listdir(tmp_path / "models" / "blobs")
    loaded, rec = artifacts.load(rec_path, expect_key=cache.key)
    ext = ".keras" if name == "dense" else ".joblib"
    assert sorted(folder) == sorted([f"{name}.json", f"{name}-{rec['sha256'][:12]}{ext}", f"{name}.MODEL_CARD.md"])
    assert rec["file"] in folder
    X = cache.splits["test"].features
    assert np.array_equal(loaded.predict(X), est.predict(X))
    assert np.array_equal(heads.scores(loaded, X), heads.scores(est, X))
    assert rec["cache_key"] == cache.key and rec["class_names"] == cache.class_names
    assert rec["head"] == name and rec["kind"] == ("keras" if name == "dense" else "sklearn")
    assert {"keras", "scikit-learn", "tensorflow", "numpy"} <= set(rec["versions"])
    assert rec["metrics"] == {"test": {"accuracy": 1.0}} and rec["config"] == {"head": name}
    model_file = os.path.join(os.path.dirname(rec_path), rec["file"])
    assert rec["sha256"] == records.file_digest(model_file)
    if name == "dense":
        assert isinstance(loaded, dense.DenseHead)
        assert loaded.history_ == est.history_ and len(loaded.history_["loss"]) == 8
        assert loaded.model_.input_shape == (None, 12)
        assert [l.name for l in loaded.model_.layers] == [l.name for l in est.model_.layers]
        assert loaded.get_params() == est.get_params()


def test_load_head_finds_the_record_from_file_or_folder(cache, tmp_path):
    est, rec_path = fit_and_save(cache, tmp_path / "models", "logreg")
    X = cache.splits["test"].features
    model_file = os.path.join(os.path.dirname(rec_path), json.loads(open(rec_path).read())["file"])
    for where in (rec_path, model_file, os.path.dirname(rec_path)):
        assert np.array_equal(artifacts.load_head(where).predict(X), est.predict(X))
    assert artifacts.find_record(rec_path.replace(".json", ".joblib")) == rec_path  # a legacy file name
    fit_and_save(cache, tmp_path / "models", "knn")
    with pytest.raises(PipelineError, match="expected one head record in the folder, found knn.json, logreg.json"):
        artifacts.load_head(os.path.dirname(rec_path))


@pytest.fixture
def no_unpickling(monkeypatch):
    import keras

    def refuse(*a, **k):
        raise AssertionError("loaded although the record check should have refused")

    monkeypatch.setattr(joblib, "load", refuse)
    monkeypatch.setattr(keras.saving, "load_model", refuse)


@pytest.mark.parametrize("name", ["logreg", "dense"])
def test_tampered_file_is_refused_before_loading(cache, tmp_path, name, request):
    _, rec_path = fit_and_save(cache, tmp_path / "models", name)
    request.getfixturevalue("no_unpickling")
    model_file = os.path.join(os.path.dirname(rec_path), json.loads(open(rec_path).read())["file"])
    with open(model_file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(PipelineError, match=r"changed since it was saved \(sha256 differs"):
        artifacts.load(rec_path)


def test_record_of_another_cache_is_refused(cache, tmp_path, no_unpickling):
    _, rec_path = fit_and_save(cache, tmp_path / "models", "logreg")
    other = store.load(write_cache(tmp_path / "other.h5", dim=12, seed=9))
    assert other.key != cache.key
    with pytest.raises(PipelineError, match=f"trained on cache {cache.key[:12]}, not on {other.key[:12]}"):
        artifacts.load(rec_path, expect_key=other.key)


def test_other_versions_missing_file_and_foreign_records_are_refused(cache, tmp_path, no_unpickling):
    _, rec_path = fit_and_save(cache, tmp_path / "models", "logreg")
    rec = json.loads(open(rec_path).read())
    rec["versions"]["scikit-learn"] = "0.24.2"
    open(rec_path, "w").write(json.dumps(rec))
    with pytest.raises(PipelineError, match="made with scikit-learn 0.24.2, this is scikit-learn"):
        artifacts.load(rec_path)
    model_file, rec["file"] = rec["file"], "../../elsewhere.joblib"
    open(rec_path, "w").write(json.dumps(rec))
    with pytest.raises(PipelineError, match="unexpected file"):
        artifacts.load(rec_path)
    os.remove(os.path.join(os.path.dirname(rec_path), model_file))
    rec["file"] = model_file
    open(rec_path, "w").write(json.dumps(rec))
    with pytest.raises(PipelineError, match=f"{model_file}: missing"):
        artifacts.load(rec_path)
    open(rec_path, "w").write(json.dumps({"format": "something else"}))
    with pytest.raises(PipelineError, match="not a head record of this program"):
        artifacts.load(rec_path)


def test_writes_are_atomic(cache, tmp_path, monkeypatch):
    _, rec_path = fit_and_save(cache, tmp_path / "models", "logreg")
    before = {p: open(os.path.join(os.path.dirname(rec_path), p), "rb").read()
              for p in os.listdir(os.path.dirname(rec_path))}

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(joblib, "dump", crash)
    with pytest.raises(OSError, match="disk full"):
        fit_and_save(cache, tmp_path / "models", "logreg")
    after = {p: open(os.path.join(os.path.dirname(rec_path), p), "rb").read()
             for p in os.listdir(os.path.dirname(rec_path))}
    assert after == before  # no temp file left, the previous head and record untouched


def folder_bytes(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in os.listdir(folder)}


@pytest.mark.slow
@pytest.mark.parametrize("kill", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("name", ["logreg", "dense"])
def test_a_kill_between_the_model_file_and_its_record_keeps_the_previous_head(cache, tmp_path, monkeypatch,
                                                                               name, kill):
    est, rec_path = fit_and_save(cache, tmp_path / "models", name)
    X = cache.splits["test"].features
    before = est.predict(X)
    rec_before = open(rec_path, "rb").read()

    def killed(*a, **k):
        raise kill()

    monkeypatch.setattr(records, "write_json", killed)
    params = heads.get(name).resolve({"EPOCHS": "3"} if name == "dense" else {"C": "0.01"})
    other = heads.build(name, params, seed=2)
    other.fit(cache.splits["train"].features, cache.splits["train"].labels)
    with pytest.raises(kill):  # killed after the new model file is in place, before its record is written
        artifacts.save(other, name=name, head=name, params=params, cache=cache, config={}, metrics={},
                       models_dir=str(tmp_path / "models"))
    monkeypatch.undo()
    assert open(rec_path, "rb").read() == rec_before
    loaded, _ = artifacts.load(rec_path, expect_key=cache.key)  # still loadable, with its old predictions
    assert np.array_equal(loaded.predict(X), before)
    assert len(os.listdir(os.path.dirname(rec_path))) == 4  # the record, its file, its card, the orphan new file
    _, rec_path = fit_and_save(cache, tmp_path / "models", name)  # the next save removes the orphan
    assert sorted(os.listdir(os.path.dirname(rec_path))) == sorted([f"{name}.json", f"{name}.MODEL_CARD.md",
                                                                     json.loads(open(rec_path).read())["file"]])


def test_a_save_removes_the_files_no_record_names(cache, tmp_path):
    folder = tmp_path / "models" / "blobs"
    _, knn = fit_and_save(cache, tmp_path / "models", "knn")
    others = set(os.listdir(folder))  # another head's record and file stay
    stale = ["logreg.joblib", "logreg-0123456789ab.joblib", "logreg.keras",  # legacy, older save, other kind
             ".logreg.joblib.k1ll3d_x.tmp.joblib", ".logreg.json.abc_123x.tmp",  # records.atomic_path's leftovers
             ".logreg-0123456789ab.joblib.zz9xyzab.tmp.joblib"]
    kept = ["logreg-notasha.joblib", "logreg_l1-0123456789ab.joblib", ".logreg_l1.json.abc_123x.tmp",
            "notes.txt"]
    for f in stale + kept:
        (folder / f).write_bytes(b"old")
    est, rec_path = fit_and_save(cache, tmp_path / "models", "logreg")
    rec = json.loads(open(rec_path).read())
    assert set(os.listdir(folder)) == others | {"logreg.json", "logreg.MODEL_CARD.md", rec["file"], *kept}
    assert rec["file"] == f"logreg-{rec['sha256'][:12]}.joblib"
    X = cache.splits["test"].features
    assert np.array_equal(artifacts.load_head(rec_path).predict(X), est.predict(X))
    assert artifacts.load_head(knn) is not None
