"""The ``views`` bench section on a tiny tree: cached views (one cache of the largest count serving the others)
against the guide's frozen backbone trained with augmentation, every row it reports. Speed is not asserted."""

import json

import pytest
from conftest import MOBILENET_V2_FILE, make_tree

from pipeline import cli

pytestmark = pytest.mark.slow


def test_views_section_reports_every_count_the_guide_and_their_ratios(tmp_path, capsys):
    data = make_tree(tmp_path / "data", classes=("cat", "dog", "fox"), per_class=8, size=(40, 32))
    argv = ["bench", "SECTIONS=views", f"DATA={data}", "BACKBONE=mobilenet_v2", "ALPHA=0.35", "SIZE=32",
            f"VIEWS_BACKBONES=mobilenet_v2:0.35:{MOBILENET_V2_FILE}", "VIEWS_COUNTS=1,2", "VIEWS_EPOCHS=2",
            "BATCH=4", "VAL_FRACTION=0.25", "TEST_FRACTION=0.25", f"CACHE_DIR={tmp_path / 'cache'}",
            f"REPORTS_DIR={tmp_path / 'reports'}", "TAG=views"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    [path] = (tmp_path / "reports").glob("bench-*-views.json")
    sec = json.loads(path.read_text())["sections"]["views"]
    assert list(json.loads(path.read_text())["sections"]) == ["views"] and "error" not in sec, sec
    [row] = sec["rows"]
    assert "error" not in row, row
    assert list(row["by_k"]) == ["0", "1", "2"]  # 0 always; 1 served by the cache of 2
    assert row["by_k"]["1"]["estimated"] and not row["by_k"]["2"]["estimated"]
    x0, x2 = row["extract_s"]["0"], row["extract_s"]["2"]
    e0, e2 = row["phase_s"]["0"], row["phase_s"]["2"]
    assert 0 < e0 < x0 and 0 < e2 < x2 and row["per_view_s"] == pytest.approx((e2 - e0) / 2)
    assert row["by_k"]["1"]["extract_s"] == pytest.approx(x0 + row["per_view_s"])
    assert row["cache_mib"]["2"] > row["cache_mib"]["0"] > 0
    for by in row["by_k"].values():
        for h in ("logreg", "dense"):
            r = by["heads"][h]
            assert 0 <= r["test"] <= 1 and 0 <= r["val"] <= 1
            assert r["wall_s"] == pytest.approx(by["extract_s"] + r["fit_s"])
    g = row["guide"]
    assert 0 <= g["test"] <= 1 and g["epochs"] == 2 and g["wall_s"] > g["fit_s"] >= 2 * 0.5 * g["epoch_s"] > 0
    assert row["ratio"] == pytest.approx(row["by_k"]["2"]["heads"]["dense"]["wall_s"] / g["wall_s"])
    assert row["breakeven_epochs"] == pytest.approx(x2 / g["epoch_s"])
    assert isinstance(sec["met"], bool) and sec["goal"].startswith("K-view head >= guide")
    for text in ("extraction VIEWS=2 (whole command)", "extraction per view of one image", "VIEWS=1 dense: test accuracy", "guide: seconds per epoch",
                 "dense wall / guide wall (goal <= 0.2)", "break-even epochs"):
        assert text in out, text


def test_views_counts_must_be_whole_numbers(capsys):
    assert cli.main(["bench", "SECTIONS=views", "VIEWS_COUNTS=4,x"]) == 2
    assert "VIEWS_COUNTS='4,x'" in capsys.readouterr().err
