"""``audit`` end to end: the API and the CLI on a real flowers5 cache with planted problems (every section
and file written, no TensorFlow imported when the cache is current), and bad input: a one-line error or a
skipped section with its reason on the page, never a traceback."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from audit_data import planted
from conftest import MOBILENET_V2_FILE, ROOT
from synthetic import blobs, write_arrays

import pipeline
from pipeline import cli
from pipeline.reports.audit import step

pytestmark = pytest.mark.slow

HEADINGS = [title for _, title, _ in step.SECTIONS]
FILES = ["exact_duplicates.csv", "index.html", "label_issues.csv", "near_duplicates.csv", "outliers.csv",
         "summary.json", "unknown_scores.csv"]


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return planted(tmp_path_factory, size=96)


def test_audit_writes_every_section_and_its_files(flowers, tmp_path):
    path, plants = flowers
    summary = pipeline.audit(cache=path, reports_dir=str(tmp_path / "reports"))
    out = tmp_path / "reports" / Path(path).stem / "audit"
    assert sorted(os.listdir(out)) == FILES and summary["page"] == str(out / "index.html")
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert not any("skipped" in summary[k] for k, _, _ in step.SECTIONS)
    rows = list(csv.DictReader(open(out / "label_issues.csv", newline="")))
    assert list(rows[0]) == ["path", "split", "given", "suggested", "quality", "p_given", "p_suggested"]
    assert [float(r["quality"]) for r in rows] == sorted(float(r["quality"]) for r in rows)
    near = list(csv.DictReader(open(out / "near_duplicates.csv", newline="")))
    assert {(r["path"], r["train_path"]) for r in near} == set(plants["copies"].items())
    assert summary["duplicates"]["exact_across_splits"] == 1 and summary["outliers"]["top"][0] == plants["digit"]
    assert 0 < summary["unknown"]["rejected"]["val"] <= 0.05 + 1 / 21
    page = (out / "index.html").read_text()
    assert all(f"<h2>{h}</h2>" in page for h in HEADINGS) and "Skipped" not in page
    assert not re.search(r'(src|href)="(?!data:|#)', page), "the page refers to something outside itself"
    assert page.count('src="data:image/jpeg;base64,') >= 20 and page.count('src="data:image/png;base64,') == 3


def test_the_cli_audits_a_current_cache_without_tensorflow(flowers, tmp_path):
    path, _ = flowers
    tree = Path(path).parent.parent / "data"
    argv = ["audit", f"DATA={tree}", "BACKBONE=mobilenet_v2", "ALPHA=0.35", f"WEIGHTS={MOBILENET_V2_FILE}", "SIZE=96",
            f"CACHE_DIR={Path(path).parent}", f"REPORTS_DIR={tmp_path}", "EXTRACT=0", "SHOW=4"]
    code = ("import sys; from pipeline import cli; code = cli.main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow imported'; "
            "sys.exit(code)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == f"wrote {tmp_path / Path(path).stem / 'audit' / 'index.html'}"
    assert any(line.startswith("label issues: ") for line in lines)
    assert any(line.startswith("near-duplicates: 3 val/test image(s)") for line in lines)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.parametrize("option, message", [
    ("FOLDS=1", "error: FOLDS=1: needs at least 2"),
    ("REJECT_RECALL=1.5", "error: REJECT_RECALL=1.5: a share of the known images, in (0, 1]"),
    ("NEAR_FRACTION=-1", "error: NEAR_QUANTILE=0.01, NEAR_FRACTION=-1.0: the quantile in [0, 1], the fraction >= 0"),
])
def test_bad_options_are_one_line_errors(capsys, tmp_path, option, message):
    cache = write_arrays(tmp_path / "c.h5", ("a", "b"), blobs(("a", "b"), dim=4))
    code, out, err = run(capsys, "audit", f"CACHE={cache}", f"REPORTS_DIR={tmp_path}", option)
    assert code == 2 and err.strip() == message


def test_a_missing_cache_is_a_one_line_error(capsys, tmp_path):
    code, out, err = run(capsys, "audit", f"CACHE={tmp_path / 'nope.h5'}", f"REPORTS_DIR={tmp_path}")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nope.h5'}: no such cache file; make it with make features"


def page_of(tmp_path, name):
    return (tmp_path / "reports" / name / "audit" / "index.html").read_text()


@pytest.mark.parametrize("name, classes, counts, skipped", [
    ("one", ("cat",), {"train": 12, "val": 4, "test": 4},
     {"Label issues": "needs at least two classes in train+val; this cache has 1",
      "Calibration": "needs a train split with at least two classes",
      "Unknown-image rejection": "needs a train split with at least two classes"}),
    ("few", ("cat", "dog"), {"train": [20, 3], "val": [5, 1], "test": 4},
     {"Label issues": "class dog (4) has fewer train+val images than FOLDS=5; add images or lower FOLDS"}),
    ("notest", ("cat", "dog"), {"train": 20, "val": 6}, {}),
    ("noval", ("cat", "dog"), {"train": 20, "test": 6},
     {"Calibration": "needs a val split to fit the temperature on",
      "Unknown-image rejection": "needs a val split to choose the threshold on"}),
])
def test_bad_caches_skip_sections_with_their_reason(capsys, tmp_path, name, classes, counts, skipped):
    """One class, a class with fewer images than folds, no test split, no val split (a split left out)."""
    cache = write_arrays(tmp_path / f"{name}.h5", classes, blobs(classes, counts, dim=8))
    code, out, err = run(capsys, "audit", f"CACHE={cache}", f"REPORTS_DIR={tmp_path / 'reports'}")
    assert code == 0, err
    page = page_of(tmp_path, name)
    for title in HEADINGS:
        assert f"<h2>{title}</h2>" in page
    for title, why in skipped.items():
        assert f"{title.lower()}: skipped: {why}" in out.splitlines()
        section = page.split(f"<h2>{title}</h2>")[1].split("</section>")[0]
        assert f"Skipped: {why}" in section
    assert page.count("Skipped: ") == len(skipped) + 1  # + exact duplicates: a synthetic cache has no hashes
