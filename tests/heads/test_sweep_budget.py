"""The sweep past MEMORY_BUDGET: cross-validation on a stratified, seeded sample of train+val whose float64 copy
takes half the budget, its size said in one line and kept in the winner's record."""

import json

import numpy as np

from pipeline import cli
from pipeline.bench import synthetic
from pipeline.cache import store
from pipeline.heads import sweep


def test_the_sample_keeps_each_class_share_and_is_seeded():
    y = np.repeat([0, 1, 2], [600, 300, 3])
    a = sweep.stratified_sample(y, 90, seed=4, least=2)
    assert np.array_equal(a, np.unique(a)) and np.array_equal(a, sweep.stratified_sample(y, 90, seed=4, least=2))
    # each class its share (rounded down), the rare one at least `least`: 90 rows in all
    assert np.bincount(y[a]).tolist() == [600 * 90 // 903, 300 * 90 // 903, 2] == [59, 29, 2]
    assert not np.array_equal(a, sweep.stratified_sample(y, 90, seed=5, least=2))
    assert np.array_equal(sweep.stratified_sample(y, len(y), seed=4), np.arange(len(y)))


def test_the_sweep_past_the_budget_cross_validates_on_a_stratified_sample_and_says_its_size(tmp_path, capsys):
    path = synthetic.write_cache(tmp_path / "cache" / "s.h5", 3000, dim=32, classes=3)
    c = store.load(path)
    n = len(c.train.y) + len(c.val.y)
    budget = 2 * 8 * 32 * 500  # half of it holds 500 float64 rows of 32 features
    args = ["sweep", f"CACHE={path}", "HEADS=logreg", "CV=3", "JOBS=1", f"MEMORY_BUDGET={budget}",
            f"MODELS_DIR={tmp_path / 'models'}", f"REPORTS_DIR={tmp_path / 'reports'}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "MEMORY_BUDGET" in line]
    assert len(said) == 1, out
    k = int(said[0].split("stratified sample of ")[1].split()[0])
    assert 495 <= k <= 500 and f"of {k} of {n} train+val rows (HEAD_SEED=0)" in said[0], said
    assert f"3-fold CV on train+val ({k} x 32" in out, out
    [record] = (tmp_path / "reports").glob("*/best/metrics.json")
    m = json.loads(record.read_text())
    assert m["trained_on"] == f"train+val sample of {k} rows" and m["test"]["accuracy"] > 0.75, m
    assert cli.main(args[:-3] + args[-2:]) == 0  # within the default budget: every row, nothing said
    assert "MEMORY_BUDGET" not in capsys.readouterr().out
