"""``make head CALIBRATE=temperature REJECT_RECALL=...``: the temperature and the unknown-image threshold fitted
on val and stored in the head's record; predict, the Python API and the exports apply them; a record without
them predicts as before. Real flowers5 photos, MobileNetV2 features at 64 px."""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
from test_predict import cached_scores, flowers_models

import pipeline
from pipeline import cli, records
from pipeline.cache import store
from pipeline.configs import ExportConfig
from pipeline.heads import artifacts, registry
from pipeline.reports.audit import calibration
from pipeline.serve import export

pytestmark = pytest.mark.slow

OVER_CONFIDENT = {"logreg": {"C": "1000"}}  # hardly regularised on 24 train images: sure of everything


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    return flowers_models(tmp_path_factory.mktemp("calibrated"), OVER_CONFIDENT, calibrate="temperature",
                          reject_recall=0.95)


def with_record(rec_path, name, **changes):
    """A copy of a head record beside it (same model file) with fields changed (None: removed)."""
    rec = records.read_json(rec_path)
    for k, v in changes.items():
        if v is None:
            rec.pop(k, None)
        else:
            rec[k] = v
    path = os.path.join(os.path.dirname(rec_path), name + ".json")
    records.write_json(path, rec)
    return path


def predicted(capsys, rec_path, files, out):
    code = cli.main(["predict", *files, f"MODEL={rec_path}", "TOP_K=5", f"OUTPUT={out}"])
    std = capsys.readouterr()
    assert code == 0, std.err
    return std.out, (json.loads(out.read_text())["predictions"] if str(out).endswith(".json") else
                     list(csv.reader(open(out, newline=""), delimiter="\t")))


def test_the_temperature_is_stored_and_lowers_the_val_nll_of_an_over_confident_head(calibrated):
    cache_path, recs, _ = calibrated
    rec = records.read_json(recs["logreg"])
    assert rec["temperature"] > 1  # over-confident: softened
    assert rec["reject_score"] == "max_probability" and 0 < rec["reject_threshold"] < 1
    cache, est = store.load(cache_path), artifacts.load_head(recs["logreg"])
    va = cache.splits["val"]
    p, y = registry.scores(est, va.features), np.searchsorted(est.classes_, va.labels)
    before, after = calibration.nll(p, y), calibration.nll(calibration.scaled(p, rec["temperature"]), y)
    assert after < before
    assert rec["calibration"]["val"]["before"]["nll"] == pytest.approx(before)
    assert rec["calibration"]["val"]["after"]["nll"] == pytest.approx(after)
    kept = calibration.scaled(p, rec["temperature"]).max(axis=1) >= rec["reject_threshold"]
    assert kept.mean() >= 0.95  # the threshold keeps REJECT_RECALL of the known val images


def test_predict_and_the_python_api_apply_the_temperature(calibrated, tmp_path, capsys):
    cache_path, recs, _ = calibrated
    files, names, raw = cached_scores(recs["logreg"], cache_path)
    want = calibration.scaled(raw, records.read_json(recs["logreg"])["temperature"])
    _, preds = predicted(capsys, recs["logreg"], files, tmp_path / "p.json")
    api = pipeline.predict(files, model=recs["logreg"], top_k=5)
    for p, a, row in zip(preds, api, want):
        got = {t["label"]: t["probability"] for t in p["top"]}
        np.testing.assert_allclose([got[n] for n in names], row, atol=1e-5)
        assert dict(a["top"]) == pytest.approx(got, abs=1e-9) and a["unknown"] == p["unknown"]
        assert p["unknown"] == bool(row.max() < records.read_json(recs["logreg"])["reject_threshold"])


def test_predict_says_unknown_below_the_threshold_and_keeps_the_top_classes(calibrated, tmp_path, capsys):
    cache_path, recs, _ = calibrated
    files, names, raw = cached_scores(recs["logreg"], cache_path)
    top = calibration.scaled(raw, records.read_json(recs["logreg"])["temperature"]).max(axis=1)
    threshold = float(np.median(top))  # about half the images below it
    forced = with_record(recs["logreg"], "forced", reject_threshold=threshold)
    out, preds = predicted(capsys, forced, files, tmp_path / "p.json")
    assert [p["unknown"] for p in preds] == list(top < threshold) and 0 < sum(top < threshold) < len(files)
    assert all(len(p["top"]) == 5 for p in preds)
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert [lines[f].endswith("  unknown") for f in files] == list(top < threshold)
    _, rows = predicted(capsys, forced, files, tmp_path / "p.tsv")
    assert rows[0][-2:] == ["unknown", "error"]
    assert [r[-2] == "unknown" for r in rows[1:]] == list(top < threshold)


def test_a_record_without_calibration_predicts_as_before(calibrated, tmp_path, capsys):
    cache_path, recs, _ = calibrated
    files, names, raw = cached_scores(recs["logreg"], cache_path)
    old = with_record(recs["logreg"], "old", temperature=None, reject_threshold=None, reject_score=None,
                      calibration=None)
    _, preds = predicted(capsys, old, files, tmp_path / "p.json")
    for p, row in zip(preds, raw):
        assert "unknown" not in p
        got = {t["label"]: t["probability"] for t in p["top"]}
        np.testing.assert_allclose([got[n] for n in names], row, atol=1e-5)
    _, rows = predicted(capsys, old, files, tmp_path / "p.tsv")
    assert "unknown" not in rows[0]


def test_bad_calibrate_is_one_line(tmp_path, capsys):
    code = cli.main(["head", f"CACHE={tmp_path / 'none.h5'}", "CALIBRATE=platt"])
    err = capsys.readouterr().err
    assert code != 0 and "CALIBRATE=platt" in err and len(err.strip().splitlines()) == 1


def test_an_export_carries_the_temperature_and_threshold_and_predicts_with_them(calibrated, tmp_path, capsys):
    cache_path, recs, _ = calibrated
    fmt = "onnx" if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "tf2onnx")) else "keras"
    rec_path = export.run(ExportConfig(model=recs["logreg"], format=fmt, out=str(tmp_path / "x"), tolerance=1e-3),
                          log=lambda m: None)  # C=1000: large coefficients amplify float32 rounding
    head, rec = records.read_json(recs["logreg"]), records.read_json(rec_path)
    assert rec["temperature"] == head["temperature"] and rec["reject_threshold"] == head["reject_threshold"]
    assert rec["reject_score"] == "max_probability"
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(os.path.join(tmp_path / "x", rec["file"])).metadata_props}
        assert float(props["temperature"]) == head["temperature"]
        assert float(props["reject_threshold"]) == head["reject_threshold"]
    files, names, _ = cached_scores(recs["logreg"], cache_path)
    _, from_head = predicted(capsys, recs["logreg"], files, tmp_path / "h.json")
    _, from_export = predicted(capsys, rec_path, files, tmp_path / "e.json")
    for h, e in zip(from_head, from_export):
        assert h["unknown"] == e["unknown"] or abs(max(t["probability"] for t in h["top"])
                                                   - head["reject_threshold"]) < 1e-3
        got = {t["label"]: t["probability"] for t in e["top"]}
        np.testing.assert_allclose([got[t["label"]] for t in h["top"]], [t["probability"] for t in h["top"]],
                                   atol=1e-3)
