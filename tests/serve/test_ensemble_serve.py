"""Predict and export of a head on a feature ensemble (BACKBONE=a+b): predict gives the head's predictions on the
joined cache (each member decoded at its own size), the export is one multi-branch model verified like any
export and close to the cached pipeline on real images; a missing member cache or a changed standardisation is
one line."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, flowers_subset

from pipeline import cli
from pipeline.cache import ensemble
from pipeline.configs import ExportConfig
from pipeline.errors import PipelineError
from pipeline.heads import artifacts
from pipeline.heads import registry as heads
from pipeline.serve import export

pytestmark = pytest.mark.slow

MEMBERS = "mobilenet_v2@40+mobilenet_v2@32"  # the second branch resizes inside the exported model
HEADS = {"logreg": [], "dense": ["HIDDEN=8", "EPOCHS=5"], "knn": ["N_NEIGHBORS=3"]}


def _opts(root):
    return [f"DATA={root / 'data'}", f"BACKBONE={MEMBERS}", "ALPHA=0.35", f"WEIGHTS={MOBILENET_V2_FILE}",
            "VAL_FRACTION=0.25", "TEST_FRACTION=0.25", "BATCH=8", f"CACHE_DIR={root / 'cache'}",
            f"MODELS_DIR={root / 'models'}", f"REPORTS_DIR={root / 'reports'}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A flowers5 subset (4 photos a class), its member caches (MobileNetV2 0.35 at 40 and 32 px) and the
    HEADS trained on their join: (root, member cache paths, {head: record path})."""
    root = tmp_path_factory.mktemp("ensserve")
    flowers_subset(root / "data", per_class=4)
    recs = {}
    for head, more in HEADS.items():
        assert cli.main(["head", *_opts(root), f"HEAD={head}", *more]) == 0
        recs[head] = glob.glob(str(root / "models" / "*" / f"{head}.json"))[0]
    rec = json.loads(open(recs["logreg"]).read())
    return root, [m["path"] for m in rec["ensemble"]["members"]], recs


def _cached(paths, rec_path):
    """(test image files, class names, the head's scores on the joined cache's test rows)."""
    joined = ensemble.join(paths, MEMBERS)
    est = artifacts.load_head(rec_path, expect_key=joined.key)
    te = joined.test
    return ([os.path.join(joined.config["source_root"], p) for p in te.paths],
            [joined.class_names[int(c)] for c in est.classes_], heads.scores(est, te.features))


def _predict(files, model, out, names, capsys):
    code = cli.main(["predict", *files, f"MODEL={model}", "TOP_K=5", f"OUTPUT={out}"])
    err = capsys.readouterr().err
    assert code == 0, err
    preds = json.loads(out.read_text())["predictions"]
    assert [p["path"] for p in preds] == files
    return np.array([[{t["label"]: t["probability"] for t in p["top"]}[n] for n in names] for p in preds]), err


@pytest.mark.parametrize("head", list(HEADS))
def test_predict_on_an_ensemble_head_equals_the_head_on_the_joined_cache(trained, head, tmp_path, capsys):
    _, paths, recs = trained
    files, names, want = _cached(paths, recs[head])
    got, err = _predict(files, recs[head], tmp_path / "p.json", names, capsys)
    assert f"({head} head on {MEMBERS} features)" in err
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_record_holds_the_standardisation_the_head_was_fitted_after(trained):
    _, paths, recs = trained
    rec = json.loads(open(recs["logreg"]).read())
    stats = ensemble.decode_stats(rec["ensemble"]["standardisation"], recs["logreg"])
    joined = ensemble.join(paths, MEMBERS)
    for k in ("mean", "std"):
        np.testing.assert_array_equal(stats[k], joined.stats[k])
    assert [m["size"] for m in rec["ensemble"]["members"]] == [40, 32]
    changed = {**rec["ensemble"]["standardisation"], "sha256": "0" * 64}
    with pytest.raises(PipelineError, match=r"standardisation is damaged or changed \(sha256 mismatch\); retrain"):
        ensemble.decode_stats(changed, recs["logreg"])


@pytest.mark.parametrize("head,fmt", [("logreg", "keras"), ("logreg", "onnx"), ("dense", "keras"),
                                      ("dense", "onnx")])
def test_an_ensemble_exports_as_one_multi_branch_model_close_to_the_cached_pipeline(trained, head, fmt, tmp_path,
                                                                                    capsys):
    _, paths, recs = trained
    said = []
    rec_path = export.run(ExportConfig(model=recs[head], format=fmt, out=str(tmp_path), judge=fmt == "onnx",
                                       latency_runs=1), log=said.append)
    rec = json.loads(open(rec_path).read())
    assert rec["input"]["shape"] == [None, 40, 40, 3]  # the largest member size
    v = rec["verification"]
    files, names, want = _cached(paths, recs[head])
    assert v["images"] == len(files) and v["max_abs_diff"] <= 1e-4 and v["argmax_agree"] == len(files)
    if fmt == "onnx":  # judged on the whole test split in onnxruntime, against the Keras model
        assert rec["judgement"]["agreement"] == 1.0 and rec["judgement"]["max_prob_diff"] <= 1e-4
    artifact = os.path.join(os.path.dirname(rec_path), rec["file"])
    got, _ = _predict(files, artifact, tmp_path / "p.json", names, capsys)
    # not equal: the cache decoded each member's size from the file, the model resizes 40 -> 32 px in its graph
    agree, diff = float((got.argmax(1) == want.argmax(1)).mean()), np.abs(got - want)
    print(f"{head} {fmt}: top-1 agreement {agree:.3f}, probability difference mean {diff.mean():.4f} max {diff.max():.4f}")
    assert agree >= 0.8 and diff.mean() <= 0.05 and diff.max() <= 0.25, (agree, diff.mean(), diff.max())


def test_a_non_linear_head_on_an_ensemble_is_refused_by_export_in_one_line(trained, tmp_path):
    _, _, recs = trained
    with pytest.raises(PipelineError, match="a knn head has no Keras form"):
        export.run(ExportConfig(model=recs["knn"], format="keras", out=str(tmp_path)), log=lambda m: None)


def test_a_missing_member_cache_is_one_line_naming_the_command(trained, capsys):
    root, paths, recs = trained
    files, _, _ = _cached(paths, recs["logreg"])
    moved = paths[1] + ".away"
    shutil.move(paths[1], moved)
    try:
        code = cli.main(["predict", files[0], f"MODEL={recs['logreg']}"])
    finally:
        shutil.move(moved, paths[1])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"the cache of its ensemble member mobilenet_v2@32, {paths[1]}, is gone; make it again with: " \
           "make features" in err[0] and "SIZE=32" in err[0]
