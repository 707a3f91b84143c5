"""``bench SECTIONS=quality SEEDS=...``: mean and spread over split seeds, on a tiny tree and random backbones."""

import json

import numpy as np
import pytest
from conftest import make_tree

from pipeline import cli

pytestmark = pytest.mark.slow

SINGLES = ["mobilenet_v2 a0.5 (none)", "mobilenet a0.5 (none)"]


def test_quality_over_seeds_reports_mean_and_spread_of_each_row(tmp_path, capsys):
    data = make_tree(tmp_path / "data", classes=("cat", "dog", "fox"), per_class=8, size=(40, 32))
    argv = ["bench", "SECTIONS=quality", "SEEDS=0,1", f"DATA={data}", "BACKBONE=mobilenet_v2", "ALPHA=0.5",
            "WEIGHTS=none", "SIZE=32", "BATCH=8", "QUALITY=mobilenet_v2:0.5:none,mobilenet:0.5:none",
            "POOLINGS=avg,gem", "VAL_FRACTION=0.25", "TEST_FRACTION=0.25", f"CACHE_DIR={tmp_path / 'cache'}",
            f"REPORTS_DIR={tmp_path / 'reports'}", "TAG=seeds", "FINETUNE=1",
            "FINETUNE_ARGS=FINETUNE_EPOCHS=1 EPOCHS=3 VERBOSE=0"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    [json_path] = (tmp_path / "reports").glob("bench-*-seeds.json")
    [md_path] = (tmp_path / "reports").glob("bench-*-seeds.md")
    sec = json.loads(json_path.read_text())["sections"]["quality"]
    md = md_path.read_text()
    assert "error" not in sec and sec["seeds"] == [0, 1]
    summary = {r["label"]: r for r in sec["summary"]}
    assert list(summary) == [
        "best single backbone, logreg", "best single backbone, dense", "best single backbone", "best ensemble",
        "mobilenet_v2 POOLING=avg, logreg", "mobilenet_v2 POOLING=avg, dense", "mobilenet_v2 POOLING=gem, logreg",
        "mobilenet_v2 POOLING=gem, dense", "cached dense head of mobilenet_v2 (fine-tune's start)",
        "fine-tuned mobilenet_v2 (defaults)"]
    for i, r in enumerate(sec["summary"]):
        assert "error" not in r, r
        assert len(r["test"]) == 2 and all(0 <= t <= 1 for t in r["test"])
        assert r["test_mean"] == pytest.approx(np.mean(r["test"]))
        assert r["test_spread"] == pytest.approx(max(r["test"]) - min(r["test"]))
        assert sec["metrics"][f"s{i}"][0] == pytest.approx(r["test_mean"])
        shown = f"| {r['label']} | {r['test_mean']:.3g} |"
        assert f"| quality {shown}" in md
    assert summary["best single backbone, logreg"]["picked"].endswith(", logreg")
    assert summary["best single backbone, logreg"]["picked"].split(", logreg")[0] in SINGLES
    assert summary["best ensemble"]["picked"].startswith(" + ".join(SINGLES))
    tuned = summary["fine-tuned mobilenet_v2 (defaults)"]
    start = summary["cached dense head of mobilenet_v2 (fine-tune's start)"]
    assert tuned["gain_points"] == pytest.approx([100 * (a - b) for a, b in zip(tuned["test"], start["test"])])
    verdicts = dict(map(tuple, sec["verdicts"]))
    assert "ensemble gain" in verdicts and "fine-tune gain" in verdicts
    rows = {r["label"] for r in sec["rows"]}  # every features set, each head's mean val and test
    assert rows == set(SINGLES) | {" + ".join(SINGLES), "mobilenet_v2 POOLING=avg", "mobilenet_v2 POOLING=gem"}


@pytest.mark.parametrize("opt, msg", [("SEEDS=0,x", "SEEDS='0,x'"), ("SEEDS=1,1", "distinct"),
                                      ("POOLINGS=avg,mean", "POOLINGS='avg,mean'")])
def test_bad_seeds_or_poolings_fail_in_one_line(capsys, opt, msg):
    extra = [] if opt.startswith("SEEDS") else ["SEEDS=0"]
    assert cli.main(["bench", "SECTIONS=quality", opt, *extra]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
