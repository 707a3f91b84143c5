"""Heads past MEMORY_BUDGET: the streamed logistic regression matches the in-memory one, the switch is said in
one line, dense trains from the file, and the heads that cannot scale refuse in one line."""

import json

import numpy as np
import pytest

from pipeline import cli
from pipeline.bench import synthetic
from pipeline.cache import lazy, store
from pipeline.heads import registry
from pipeline.heads.stream import StreamingLogReg


@pytest.mark.slow
def test_streamed_logreg_reaches_in_memory_logreg_accuracy(tmp_path):
    path = synthetic.write_cache(tmp_path / "mid.h5", 20000, dim=128, classes=10)
    eager = store.load(path)
    full = registry.build("logreg").fit(eager.train.X, eager.train.y)
    expected = full.score(eager.test.X, eager.test.y)
    c = store.load(path, budget=0)
    assert lazy.is_lazy(c)
    est = StreamingLogReg(seed=0).fit(c.train.X, c.train.y, (c.val.X, c.val.y))
    got = est.score(c.test.X, c.test.y)
    assert 0.3 < expected < 0.95  # the classes overlap: the accuracy means something
    assert got >= expected - 0.01, (got, expected)
    p = est.predict_proba(c.test.X)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert np.array_equal(est.classes_[p.argmax(axis=1)], est.predict(eager.test.X))


@pytest.fixture
def small(tmp_path):
    return synthetic.write_cache(tmp_path / "cache" / "s.h5", 3000, dim=32, classes=3)


def head(tmp_path, cache, *args):
    return cli.main(["head", f"CACHE={cache}", f"MODELS_DIR={tmp_path / 'models'}",
                     f"REPORTS_DIR={tmp_path / 'reports'}", *args])


def test_logreg_past_the_budget_streams_and_says_so(tmp_path, small, capsys):
    assert head(tmp_path, small, "HEAD=logreg", "MEMORY_BUDGET=64k") == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "MEMORY_BUDGET" in line]
    assert len(said) == 1 and "past MEMORY_BUDGET=64k: streaming it" in said[0]
    [metrics] = (tmp_path / "reports").glob("*/logreg/metrics.json")
    m = json.loads(metrics.read_text())
    assert m["streamed"] is True and m["test"]["accuracy"] > 0.75
    assert head(tmp_path, small, "HEAD=logreg") == 0  # within the default budget: in memory, nothing said
    assert "MEMORY_BUDGET" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["svm", "knn", "random_forest"])
def test_heads_that_cannot_scale_refuse_in_one_line(tmp_path, small, capsys, name):
    assert head(tmp_path, small, f"HEAD={name}", "MEMORY_BUDGET=64k") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert f"HEAD={name}:" in err and "past MEMORY_BUDGET=64k" in err
    assert "use HEAD=logreg (streamed) or HEAD=dense" in err


@pytest.mark.slow
def test_dense_past_the_budget_trains_from_the_file(tmp_path, small, capsys):
    assert head(tmp_path, small, "HEAD=dense", "EPOCHS=10", "BATCH_SIZE=128", "LEARNING_RATE=0.01",
                "MEMORY_BUDGET=64k") == 0
    [metrics] = (tmp_path / "reports").glob("*/dense/metrics.json")
    assert json.loads(metrics.read_text())["test"]["accuracy"] > 0.75


def test_bad_budget_is_one_line(tmp_path, small, capsys):
    assert head(tmp_path, small, "MEMORY_BUDGET=lots") == 2
    assert capsys.readouterr().err.strip().startswith("error: MEMORY_BUDGET='lots'")
