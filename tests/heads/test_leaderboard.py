"""``sweep BACKBONES=...``: the backbone x head leaderboard on tiny caches made from images, and its bad input."""

import csv
import json

import pytest
from conftest import make_tree

from pipeline import cli
from pipeline.cache import resolve
from pipeline.heads import artifacts

pytestmark = pytest.mark.slow

BACKBONES = "mobilenet_v2,mobilenet,mobilenet_v2+mobilenet"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def args(tmp_path):
    return [f"DATA={tmp_path / 'data'}", "ALPHA=0.5", "WEIGHTS=none", "SIZE=32", f"CACHE_DIR={tmp_path / 'cache'}",
            "VAL_FRACTION=0.25", "TEST_FRACTION=0.25", "BATCH=8", f"MODELS_DIR={tmp_path / 'models'}",
            f"REPORTS_DIR={tmp_path / 'reports'}", "HEADS=logreg,dense", "CV=2", "JOBS=1", "EPOCHS=3"]


def test_leaderboard_makes_the_caches_ranks_every_backbone_and_head_and_saves_the_best(capsys, tmp_path):
    make_tree(tmp_path / "data", ("cat", "dog"), per_class=12)
    code, out, err = run(capsys, "sweep", f"BACKBONES={BACKBONES}", *args(tmp_path))
    assert code == 0, err
    assert "leaderboard: cache 1 of 2: mobilenet_v2" in out and "cache 2 of 2: mobilenet" in out
    assert out.count("wrote ") >= 2  # each member's cache made once, the ensemble extracting nothing more
    folder = tmp_path / "reports" / "leaderboard" / "data"
    doc = json.loads((folder / "leaderboard.json").read_text())
    rows = doc["leaderboard"]
    assert sorted((r["backbone"], r["head"]) for r in rows) == sorted(
        (b, h) for b in BACKBONES.split(",") for h in ("logreg", "dense"))
    assert [r["cv_mean"] for r in rows] == sorted((r["cv_mean"] for r in rows), reverse=True)
    dim = {r["backbone"]: r["dim"] for r in rows}
    assert dim == {"mobilenet_v2": 1280, "mobilenet": 512, "mobilenet_v2+mobilenet": 1792}
    for r in rows:
        assert 0 <= r["val"] <= 1 and 0 <= r["test"] <= 1 and r["cv_std"] >= 0 and r["fit_seconds"] > 0
        assert r["extract_ms_per_image"] > 0  # every cache made in this run: its cost is known
    ensemble = [r for r in rows if r["backbone"] == "mobilenet_v2+mobilenet"][0]
    single = {r["backbone"]: r["extract_ms_per_image"] for r in rows if r["head"] == "logreg"}
    assert ensemble["extract_ms_per_image"] == pytest.approx(single["mobilenet_v2"] + single["mobilenet"])
    with open(folder / "leaderboard.csv") as f:
        table = list(csv.reader(f))
    assert table[0][:4] == ["rank", "backbone", "head", "cv_mean"] and len(table) == 7
    page = (folder / "index.html").read_text()
    assert page.count("<tr>") == 7 and "mobilenet_v2+mobilenet" in page and doc["best"] in page
    win = rows[0]
    _, rec = artifacts.load(str(tmp_path / "models" / resolve.stem(win["cache"]) / "best.json"))
    assert rec["head"] == win["head"] and rec["config"]["backbone"] == win["backbone"]
    assert rec["metrics"]["trained_on"] == "train+val" and rec["metrics"]["cv_score"] == win["cv_mean"]

    code, out, err = run(capsys, "sweep", f"BACKBONES={BACKBONES}", *args(tmp_path), "EXTRACT=0")
    assert code == 0, err
    again = json.loads((folder / "leaderboard.json").read_text())["leaderboard"]
    assert all(r["extract_ms_per_image"] is None for r in again)  # reused: the cache records no extraction time
    assert " - " in out.split("rank")[1]


@pytest.mark.parametrize("extra, msg", [
    (["BACKBONES=mobilenet,nope"], "nope"),
    (["BACKBONES=mobilenet,mobilenet"], "named twice"),
    (["BACKBONES=mobilenet", "CACHE=x.h5"], "BACKBONES and CACHE"),
    (["BACKBONES=mobilenet", "HEADS=logreg,nope"], "nope"),
])
def test_bad_backbones_are_one_line_before_any_work(capsys, tmp_path, extra, msg):
    code, _, err = run(capsys, "sweep", *args(tmp_path), *extra)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()
