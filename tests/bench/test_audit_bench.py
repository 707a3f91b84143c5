"""The ``audit`` bench section on a tiny real cache (a few flowers5 photos per class, MobileNetV2 0.35 at 32 px):
every figure it reports, as rates in [0, 1]; planted exact copies found by content hash; the audit command run
without TensorFlow. The goals are not asserted (tiny data)."""

import json

import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, flowers_subset

from pipeline import cli
from pipeline.bench import audit, auditparts
from pipeline.cache import ensemble, store
from pipeline.configs import BenchConfig


@pytest.mark.slow
def test_audit_section_reports_every_figure(tmp_path, capsys):
    data = flowers_subset(tmp_path / "data", per_class=12)
    argv = ["bench", "SECTIONS=audit", f"AUDIT_DATA={data}", "AUDIT_SEEDS=2", "AUDIT_PLANT=2", "AUDIT_SPLIT_SEEDS=0,1",
            "BACKBONE=mobilenet_v2", "ALPHA=0.35", "SIZE=32", f"WEIGHTS={MOBILENET_V2_FILE}", "BATCH=16",
            "VAL_FRACTION=0.25", "TEST_FRACTION=0.25", f"CACHE_DIR={tmp_path / 'cache'}",
            f"REPORTS_DIR={tmp_path / 'reports'}", "TAG=audit"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    [path] = (tmp_path / "reports").glob("bench-*-audit.json")
    sections = json.loads(path.read_text())["sections"]
    assert list(sections) == ["audit"] and "error" not in sections["audit"], sections
    sec = sections["audit"]
    assert set(auditparts.LEVERS) <= set(sec["labels"])
    for lever in auditparts.LEVERS:
        r = sec["labels"][lever]
        assert len(r["per_seed"]["auroc"]) == 2 and r["flipped"] >= 1
        for fig in ("auroc", "top_n_precision", "recall", "precision"):
            assert 0 <= r["mean"][fig] <= 1, (lever, fig)
        assert r["mean"]["extra_on_clean"] <= r["mean"]["extra"] <= r["mean"]["flagged"]
    runs = sec["open_set"]["per_split"]
    assert len(runs) == 2 and all(len(r["per_class"]) == 5 for r in runs)
    assert sec["open_set"]["mean"]["combined"]["auroc"] == pytest.approx(
        np.mean([r["mean"]["combined"]["auroc"] for r in runs]))
    for part in (sec["open_set"]["mean"], sec["far_ood"]):
        for score in auditparts.SCORES:
            assert 0 <= part[score]["auroc"] <= 1 and 0 <= part[score]["rejected"] <= 1
    for head in audit.HEADS:
        c = sec["calibration"][head]
        runs = c["per_seed"]
        assert len(runs) == 2 and c["temperature"] == pytest.approx(np.mean([r["temperature"] for r in runs]))
        for when in ("before", "after"):
            assert c[when]["ece"] == pytest.approx(np.mean([r[when]["ece"] for r in runs]))
            for r in runs:
                lo, hi = r[when]["ece_interval"]
                assert r[when]["nll"] > 0 and 0 <= lo <= r[when]["ece"] <= hi <= 1
    assert len({r["before"]["nll"] for r in sec["calibration"]["logreg"]["per_seed"]}) == 2  # two different splits
    leaks = sec["leaks"]
    assert leaks["planted"] == 6 and set(leaks["near_found"]) == {"exact", "jpeg", "resized"}
    assert leaks["exact_found"] == 1.0  # by content hash, whatever the features
    assert leaks["clean_false"] == leaks["clean_pairs"] - leaks["clean_same_photo"] >= 0
    assert sec["cost"]["tensorflow"] is False and sec["cost"]["modules"] > 100 and sec["cost"]["seconds"] > 0
    assert isinstance(sec["met"], bool)
    for text in ("blend (default): AUROC of the label quality", "near OOD (class held out, mean of classes and splits): combined",
                 "far OOD (digits among photos): knn_similarity", "dense (T=", "planted resized copies found",
                 "TensorFlow imported", "goal: leaks"):
        assert text in out, text


def test_audit_options_are_checked(capsys):
    assert cli.main(["bench", "SECTIONS=audit", "AUDIT_NOISE=1.5"]) == 2
    assert "AUDIT_NOISE=1.5" in capsys.readouterr().err
    assert cli.main(["bench", "SECTIONS=audit", "AUDIT_SPLIT_SEEDS=0,x"]) == 2
    assert "AUDIT_SPLIT_SEEDS='0,x'" in capsys.readouterr().err


def test_audit_section_joins_an_ensemble_and_its_extra_rows_alike(tmp_path):
    data = flowers_subset(tmp_path / "data", per_class=4)
    cfg = BenchConfig(audit_data=str(data), audit_backbone="mobilenet_v2@32+mobilenet_v2@48", alpha=0.35,
                      weights=str(MOBILENET_V2_FILE), cache_dir=str(tmp_path / "cache"), batch=8)
    cache, members = audit.load(cfg)
    assert [m.size for m in members] == [32, 48] and cache.members and cache.train.features.shape[1] == 2 * 1280
    rows = []
    for path in cache.members:  # each member's train rows in the joined cache's order, matched by content
        member = store.load(path)
        where = {sha: i for i, sha in enumerate(ensemble.hashes(member, path)["train"])}
        rows.append(member.train.features[[where[sha] for sha in cache.hashes["train"]]])
    again = audit.joined(cache, {"train_again": rows})["train_again"]
    assert np.allclose(again, cache.train.features, atol=1e-5)
