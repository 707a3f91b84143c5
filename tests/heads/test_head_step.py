"""``head`` and ``sweep`` end to end through the CLI: artifacts and reports, the leaderboard, bad input."""

import json
import os
import subprocess

import numpy as np
import pytest
from conftest import ROOT, make_tree
from sklearn.model_selection import StratifiedKFold, cross_val_score
from synthetic import write_arrays, write_cache, xor

from pipeline import cli
from pipeline.cache import resolve, store
from pipeline.configs import FeaturesConfig
from pipeline.heads import artifacts
from pipeline.reports import evaluate
from pipeline.heads import registry as heads

pytestmark = pytest.mark.slow


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def dirs(tmp_path):
    return [f"MODELS_DIR={tmp_path / 'models'}", f"REPORTS_DIR={tmp_path / 'reports'}"]


@pytest.fixture(scope="module")
def blob_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("c") / "blobs.h5", dim=16, sep=1.2, seed=3)


def test_head_trains_reports_and_saves(capsys, tmp_path, dirs, blob_cache):
    code, out, err = run(capsys, "head", f"CACHE={blob_cache}", "HEAD=svm", "C=10", *dirs)
    assert code == 0, err
    assert "svm C=10.0 GAMMA=scale" in out and "svm: test split (30 images)" in out
    rec_path = tmp_path / "models" / "blobs" / "svm.json"
    rep = tmp_path / "reports" / "blobs" / "svm"
    assert sorted(os.listdir(rep)) == ["confusion.png", "errors.csv", "metrics.json"]  # no photos: no sheet
    est, rec = artifacts.load(str(rec_path), expect_key=store.load(blob_cache).key)
    assert est.get_params()["clf__C"] == 10.0 and rec["params"]["c"] == 10.0 and rec["config"]["head"] == "svm"
    cache = store.load(blob_cache)
    m = json.loads((rep / "metrics.json").read_text())
    te, va = cache.splits["test"], cache.splits["val"]
    assert m["test"] == evaluate.metrics(te.labels, est.predict(te.features), cache.class_names,
                                         heads.scores(est, te.features))
    assert m["val"]["accuracy"] == pytest.approx((est.predict(va.features) == va.labels).mean())
    assert rec["metrics"] == m
    assert f"accuracy {m['test']['accuracy']:.4f}" in out
    # the same seed again: the same head, the same predictions
    assert run(capsys, "head", f"CACHE={blob_cache}", "HEAD=svm", "C=10", *dirs)[0] == 0
    assert np.array_equal(artifacts.load_head(str(rec_path)).predict(te.features), est.predict(te.features))


def test_dense_head_keeps_its_curves_and_history(capsys, tmp_path, dirs, blob_cache):
    argv = ["head", f"CACHE={blob_cache}", "HEAD=dense", "HIDDEN=16", "EPOCHS=6", "LEARNING_RATE=0.01", *dirs]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "fitted in" in out and "(6 epochs)" in out
    rep = tmp_path / "reports" / "blobs" / "dense"
    assert sorted(os.listdir(rep)) == ["confusion.png", "curves.png", "errors.csv", "history.json", "metrics.json"]
    history = json.loads((rep / "history.json").read_text())
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"} and len(history["loss"]) == 6
    est = artifacts.load_head(str(tmp_path / "models" / "blobs" / "dense.json"))
    assert est.history_ == history and est.hidden == (16,)
    assert est.model_.get_layer("head_dense_1").units == 16
    X = store.load(blob_cache).splits["test"].features
    first = est.predict_proba(X)
    assert run(capsys, *argv)[0] == 0  # same seed, retrained: same predictions
    assert np.array_equal(artifacts.load_head(str(tmp_path / "models" / "blobs" / "dense.json")).predict_proba(X),
                          first)


def test_make_passes_head_and_its_parameters():
    out = subprocess.run(["make", "-n", "head", "HEAD=svm", "C=10"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "-m pipeline head 'C=10' 'HEAD=svm'" in out
    cfg, extra = cli.parse("head", cli._steps()["head"], ["C=10", "HEAD=svm"])
    assert cfg.head == "svm" and extra == {"C": "10"}


def test_sweep_picks_the_best_cv_score(capsys, tmp_path, dirs):
    path = write_arrays(tmp_path / "xor.h5", ["even", "odd"], xor(n=40, seed=1), tag="xor")
    code, out, err = run(capsys, "sweep", f"CACHE={path}", "HEADS=logreg,knn,linear_svm", "CV=4", "JOBS=2",
                         *dirs)
    assert code == 0, err
    board = json.loads((tmp_path / "reports" / "xor" / "sweep" / "leaderboard.json").read_text())["leaderboard"]
    means = [row["mean"] for row in board]
    assert means == sorted(means, reverse=True) and {r["head"] for r in board} == {"logreg", "knn", "linear_svm"}
    best = board[0]
    assert best["head"] == "knn" and best["mean"] > 0.9  # XOR: only the non-linear head gets it
    assert max(r["mean"] for r in board[1:]) < 0.75
    for row in board:  # the best of each head is its best candidate, and candidates cover the whole grid
        assert row["mean"] == max(c["mean"] for c in row["candidates"])
        assert len(row["candidates"]) == len(heads.get(row["head"]).grid[next(iter(row["params"]))])
    # the reported CV score is real: recomputed independently with the same folds
    cache = store.load(path)
    X = np.concatenate([cache.splits["train"].features, cache.splits["val"].features])
    y = np.concatenate([cache.splits["train"].labels, cache.splits["val"].labels])
    again = cross_val_score(heads.build("knn", best["params"]), X, y,
                            cv=StratifiedKFold(4, shuffle=True, random_state=0))
    assert again.mean() == pytest.approx(best["mean"]) and again.std() == pytest.approx(best["std"])
    est, rec = artifacts.load(str(tmp_path / "models" / "xor" / "best.json"), expect_key=cache.key)
    assert rec["head"] == "knn" and rec["params"]["n_neighbors"] == best["params"]["n_neighbors"]
    assert rec["metrics"]["cv_score"] == best["mean"] and rec["metrics"]["trained_on"] == "train+val"
    assert "val" not in rec["metrics"]  # val was trained on: no val figures are claimed
    te = cache.splits["test"]
    assert rec["metrics"]["test"]["accuracy"] == pytest.approx((est.predict(te.features) == te.labels).mean())
    lines = out.splitlines()
    top = lines.index(next(l for l in lines if l.startswith("rank")))
    assert lines[top + 1].split()[:2] == ["1", "knn"] and "N_NEIGHBORS=" in lines[top + 1]
    assert (tmp_path / "reports" / "xor" / "best" / "confusion.png").exists()


def test_the_sweep_command_leaves_no_process_behind(tmp_path, blob_cache):
    """Its searches run in joblib's worker processes (JOBS=2): they end with the command."""
    import sys

    mark = f"sweep-{os.getpid()}-{id(tmp_path)}"
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", f"CACHE={blob_cache}", "HEADS=logreg,knn", "CV=2",
                        "JOBS=2", f"MODELS_DIR={tmp_path / 'models'}", f"REPORTS_DIR={tmp_path / 'reports'}"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TEST_MARK": mark},
                       timeout=120)  # a process left holding the output pipes would make this wait
    assert r.returncode == 0, r.stderr
    assert "leaderboard in " in r.stdout and not processes_with(f"TEST_MARK={mark}")


def test_sweep_includes_dense_and_every_head_by_default(capsys, tmp_path, dirs):
    path = write_cache(tmp_path / "tiny.h5", dim=8, sep=3.0, seed=2, counts={"train": 12, "val": 4, "test": 4})
    code, out, err = run(capsys, "sweep", f"CACHE={path}", "CV=2", "JOBS=1", "EPOCHS=5", "LEARNING_RATE=0.01",
                         "N_ESTIMATORS=20", "C=0.5", *dirs)
    assert code == 0, err
    board = json.loads((tmp_path / "reports" / "tiny" / "sweep" / "leaderboard.json").read_text())["leaderboard"]
    assert {r["head"] for r in board} == set(heads.HEADS)
    by = {r["head"]: r for r in board}
    # fixed parameters reach the heads that have them; C replaces the grids of the heads sweeping it
    assert by["dense"]["params"]["epochs"] == 5 and by["random_forest"]["params"]["n_estimators"] == 20
    assert by["dense"]["params"]["learning_rate"] == 0.01 and by["mlp"]["params"]["learning_rate"] == 0.01
    assert len(by["dense"]["candidates"]) == len(heads.get("dense").grid["dropout"]) and len(by["logreg"]["candidates"]) == 1
    assert by["logreg"]["params"]["c"] == 0.5 and by["svm"]["params"]["c"] == 0.5
    code, _, err = run(capsys, "sweep", f"CACHE={path}", "HEADS=logreg,knn", "HIDDEN=8")
    assert code == 2 and "no swept head (logreg, knn) has parameter 'HIDDEN'; valid: C, CLASS_WEIGHT" in err


@pytest.mark.parametrize("argv,msg", [
    (["HEAD=knnx"], "unknown head 'knnx'; valid: dense, knn, linear_svm, logreg, mlp, random_forest, svm"),
    (["HEAD=knn", "C=1"], "head 'knn' has no parameter 'C'; valid: N_NEIGHBORS, VOTE"),
    (["HEAD=logreg", "C=strong"], "C='strong': expected float"),
])
def test_unknown_head_or_parameter(capsys, blob_cache, argv, msg):
    code, out, err = run(capsys, "head", f"CACHE={blob_cache}", *argv)
    assert code == 2 and err.strip() == f"error: {msg}"


def test_sweep_bad_options(capsys, blob_cache, tmp_path):
    code, _, err = run(capsys, "sweep", f"CACHE={blob_cache}", "HEADS=logreg,nope")
    assert code == 2 and "unknown head 'nope'" in err
    code, _, err = run(capsys, "sweep", f"CACHE={blob_cache}", "HEADS=knn", "C=1")
    assert code == 2 and "no swept head (knn) has parameter 'C'; valid: N_NEIGHBORS, VOTE" in err
    code, _, err = run(capsys, "sweep", f"CACHE={blob_cache}", "SCORING=auc")
    assert code == 2 and "unknown scoring 'auc'; valid: accuracy, balanced_accuracy" in err


def test_fewer_images_per_class_than_folds(capsys, tmp_path):
    path = write_cache(tmp_path / "few.h5", counts={"train": [6, 6, 2], "val": [2, 2, 1], "test": 2})
    code, _, err = run(capsys, "sweep", f"CACHE={path}", "CV=5", "HEADS=logreg")
    assert code == 2
    assert err.strip() == ("error: fewer images than CV=5 folds in train+val for class fox (3); "
                           "lower CV or add images")


def test_class_absent_from_a_split(capsys, tmp_path):
    path = write_cache(tmp_path / "gap.h5", counts={"train": 8, "val": [3, 0, 3], "test": 3})
    for step in ("head", "sweep"):
        code, _, err = run(capsys, step, f"CACHE={path}", "CV=2")
        assert code == 2 and f"{path}: class dog has no image in the val split" in err


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_features_name_the_cache(capsys, tmp_path, bad):
    import hashlib

    import h5py

    path = write_cache(tmp_path / "bad.h5", counts={"train": 8, "val": 3, "test": 3})
    with h5py.File(path, "r+") as f:  # damaged after it was written (the writer itself refuses NaN)
        f["val"]["features"][4, 2] = bad
    for step in ("head", "sweep"):  # the checksum first: what happened is that the file changed
        code, _, err = run(capsys, step, f"CACHE={path}", "CV=2")
        assert code == 2 and err.startswith(f"error: {path}: split val has changed since it was written")
    with h5py.File(path, "r+") as f:  # as if its checksum covered the NaN (a file of an older writer)
        f["val"].attrs["sha256"] = hashlib.sha256(f["val"]["features"][()].tobytes()).hexdigest()
    for step in ("head", "sweep"):
        code, _, err = run(capsys, step, f"CACHE={path}", "CV=2")
        assert code == 2 and err.startswith(f"error: {path}: split val has NaN/inf features")


def test_missing_cache_file(capsys, tmp_path):
    code, _, err = run(capsys, "head", f"CACHE={tmp_path / 'none.h5'}")
    assert code == 2 and "none.h5: no such cache file" in err


# --- from images: the features options select (and make) the cache ---------------------------------------

def feature_args(tmp_path):
    return [f"DATA={tmp_path / 'data'}", "BACKBONE=mobilenet_v2", "ALPHA=0.35", "WEIGHTS=none", "SIZE=32",
            f"CACHE_DIR={tmp_path / 'cache'}", "VAL_FRACTION=0.25", "TEST_FRACTION=0.25", "BATCH=8"]


def test_head_from_images_makes_the_cache_first(capsys, tmp_path, dirs):
    make_tree(tmp_path / "data", ("cat", "dog"), per_class=12)
    code, out, err = run(capsys, "head", *feature_args(tmp_path), "HEAD=logreg", *dirs)
    assert code == 0, err
    assert "wrote " in out and "logreg: test split" in out
    (cache_file,) = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".h5")]
    stem = cache_file[:-3]
    est, rec = artifacts.load(str(tmp_path / "models" / stem / "logreg.json"))
    assert rec["cache_path"] == str(tmp_path / "cache" / cache_file)
    assert rec["class_names"] == ["cat", "dog"] and rec["config"]["backbone"] == "mobilenet_v2"
    code, out, err = run(capsys, "head", *feature_args(tmp_path), "HEAD=knn", *dirs)
    assert code == 0 and "up to date" in out and "wrote " not in out


def test_extract_0_names_the_make_features_command(capsys, tmp_path, dirs):
    make_tree(tmp_path / "data", ("cat", "dog"), per_class=12)
    code, _, err = run(capsys, "head", *feature_args(tmp_path), "EXTRACT=0", *dirs)
    assert code == 2 and "no feature cache for this configuration" in err
    command = err.split("make it with: ")[1].strip()
    assert command.startswith("make features ")
    assert not os.path.exists(tmp_path / "cache") or not any(
        f.endswith(".h5") for f in os.listdir(tmp_path / "cache"))
    # that very command makes the cache the head step wants
    from pipeline.cache import extract as features

    cfg, _ = cli.parse("features", cli._steps()["features"], command.split()[2:])
    features.run(cfg, log=lambda m: None)
    code, out, err = run(capsys, "head", *feature_args(tmp_path), "EXTRACT=0", *dirs)
    assert code == 0, err


def test_features_command_lists_only_what_differs():
    cfg = FeaturesConfig(data="my photos", size=160)
    assert resolve.features_command(cfg) == "make features 'DATA=my photos' SIZE=160"


@pytest.mark.parametrize("option", ["MODELS_DIR", "REPORTS_DIR"])
def test_unwritable_models_or_reports_folder_is_one_line_before_any_work(tmp_path, capsys, option):
    (tmp_path / "f").write_text("x")
    code = cli.main(["head", f"CACHE={tmp_path / 'missing.h5'}", f"{option}={tmp_path / 'f' / 'sub'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {option}={tmp_path / 'f' / 'sub'}: ") and len(err.splitlines()) == 1


def processes_with(env_entry) -> list[int]:
    """The pids of live processes whose environment holds ``env_entry`` (NAME=value), from /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if env_entry.encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


NO_TENSORFLOW = ("import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
                 "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")


def test_sklearn_head_on_a_current_cache_imports_no_tensorflow_and_a_changed_weights_file_is_not_trusted(tmp_path):
    import shutil
    import sys

    import h5py
    from conftest import MOBILENET_V2_FILE, flowers_subset

    flowers_subset(tmp_path / "data", per_class=6)
    weights = tmp_path / "w.weights.h5"
    shutil.copy(MOBILENET_V2_FILE, weights)
    args = ["head", f"DATA={tmp_path / 'data'}", "BACKBONE=mobilenet_v2", "ALPHA=0.35", f"WEIGHTS={weights}",
            "SIZE=32", "VAL_FRACTION=0.25", "TEST_FRACTION=0.25", f"CACHE_DIR={tmp_path / 'cache'}",
            f"MODELS_DIR={tmp_path / 'models'}", f"REPORTS_DIR={tmp_path / 'reports'}"]

    mark = f"pipeline-test-{os.getpid()}-{id(tmp_path)}"

    def head(code=None):
        cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "pipeline", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TEST_MARK": mark})

    first = head()
    assert first.returncode == 0, first.stderr
    # the command ends with its output flushed, its figures on disk, and no process it started outliving it
    assert first.stdout.splitlines()[-1].startswith("saved "), first.stdout
    assert next((tmp_path / "reports").glob("*/logreg/confusion.png")).stat().st_size > 0
    assert not processes_with(f"TEST_MARK={mark}")
    metrics = lambda: json.loads(next((tmp_path / "reports").glob("*/logreg/metrics.json")).read_text())["test"]  # noqa: E731
    before = metrics()
    blocked = head(NO_TENSORFLOW)  # TensorFlow and Keras unimportable: the memo proves the cache current
    assert blocked.returncode == 0, blocked.stderr
    assert "up to date" in blocked.stdout and metrics() == before

    with h5py.File(weights, "r+") as f:  # new content (and a new mtime): the memo no longer applies
        first_array = []
        f.visititems(lambda name, obj: first_array.append(obj) if isinstance(obj, h5py.Dataset) and obj.ndim else None)
        first_array[0][...] = first_array[0][()] * 1.5
    assert head(NO_TENSORFLOW).returncode != 0  # it had to build the backbone: no stale cache was trusted
    again = head()
    assert again.returncode == 0 and "wrote " in again.stdout, again.stdout  # a new cache for the new weights
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 2


def test_errors_csv_lists_exactly_the_misclassified_test_images(capsys, tmp_path, dirs):
    import csv

    path = write_cache(tmp_path / "overlap.h5", dim=6, sep=0.8, seed=4, counts={"train": 30, "val": 10, "test": 20})
    code, out, err = run(capsys, "head", f"CACHE={path}", "HEAD=logreg", *dirs)
    assert code == 0, err
    report = tmp_path / "reports" / "overlap" / "logreg"
    m = json.loads((report / "metrics.json").read_text())["test"]
    rows = list(csv.DictReader(open(report / "errors.csv", newline="")))
    cm = np.asarray(m["confusion_matrix"])
    assert len(rows) == cm.sum() - np.trace(cm) > 0 and f"{len(rows)} misclassified test image(s)" in out
    est = artifacts.load_head(str(tmp_path / "models" / "overlap" / "logreg.json"))
    test = store.load(path).test
    pred = est.predict(test.X)
    names = ["cat", "dog", "fox"]
    wrong = {(p, names[t], names[q]) for p, t, q in zip(test.paths, test.y, pred) if t != q}
    assert {(r["path"], r["true"], r["predicted"]) for r in rows} == wrong
    probs = [float(r["probability"]) for r in rows]
    assert probs == sorted(probs, reverse=True)  # the most confidently wrong first
    assert not (report / "errors.png").exists()  # no photos to show for a synthetic cache


def test_head_points_to_the_audit_when_an_exact_copy_stands_in_two_splits(tmp_path, capsys):
    import shutil

    from conftest import FLOWERS, MOBILENET_V2_FILE, require_shared
    from PIL import Image

    require_shared()
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for cls in ("daisy", "rose"):
            dest = tmp_path / "data" / split / cls
            dest.mkdir(parents=True)
            for name in sorted(os.listdir(FLOWERS / cls))[{"train": 0, "val": 4, "test": 6}[split]:][:n]:
                (dest / name).symlink_to(FLOWERS / cls / name)
    argv = ["head", f"DATA={tmp_path / 'data'}", "BACKBONE=mobilenet_v2", "ALPHA=0.35", f"WEIGHTS={MOBILENET_V2_FILE}",
            "SIZE=96", f"CACHE_DIR={tmp_path / 'cache'}", f"MODELS_DIR={tmp_path / 'models'}",
            f"REPORTS_DIR={tmp_path / 'reports'}"]
    originals = sorted((tmp_path / "data" / "train" / "daisy").iterdir())
    with Image.open(originals[1]) as im:  # a resized copy: the audit's business, no note here
        im.resize((200, 200)).save(tmp_path / "data" / "test" / "daisy" / "resized.jpg", quality=70)
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "make audit" not in out and "duplicate" not in out
    shutil.copyfile(originals[0], tmp_path / "data" / "test" / "daisy" / "copy.jpg")  # the same bytes in test
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    notes = [line for line in out.splitlines() if "make audit" in line]
    assert notes == ["note: 1 image(s) stand in more than one split (exact copies); see make audit"], out
    m = json.loads(next((tmp_path / "reports").glob("*/logreg/metrics.json")).read_text())
    assert m["exact_duplicates_across_splits"] == 1 and not list((tmp_path / "reports").glob("*/*/near_dup*"))


def test_sweep_runs_keras_heads_beside_the_others_with_the_same_scores(capsys, tmp_path, dirs):
    import threading

    from pipeline.heads import sweep

    seen = {}

    def search(name):
        seen[name] = threading.current_thread().name
        return {"head": name}

    names = ["logreg", "dense", "knn"]
    assert [r["head"] for r in sweep.overlapped(search, names, jobs=2)] == names
    assert seen["dense"].startswith("keras-heads") and seen["logreg"] == seen["knn"] == threading.main_thread().name
    sweep.overlapped(search, names, jobs=1)  # one job: one after the other, in this thread
    assert set(seen.values()) == {threading.main_thread().name}

    path = write_cache(tmp_path / "tiny.h5", dim=8, sep=3.0, seed=2, counts={"train": 12, "val": 4, "test": 4})
    boards = []
    for jobs in ("1", "2"):
        code, _, err = run(capsys, "sweep", f"CACHE={path}", "HEADS=logreg,dense,knn", "CV=2", f"JOBS={jobs}",
                           "EPOCHS=3", *dirs)
        assert code == 0, err
        board = json.loads((tmp_path / "reports" / "tiny" / "sweep" / "leaderboard.json").read_text())
        boards.append({r["head"]: [c["mean"] for c in r["candidates"]] for r in board["leaderboard"]})
    assert boards[0] == boards[1]
