"""Metrics, the printed table, JSON and PNG reports."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.reports import evaluate

NAMES = ["daisy", "rose", "tulip"]
Y = [0, 0, 1, 1, 2, 2]
P = [0, 1, 1, 1, 2, 0]


def test_metrics_on_a_worked_example():
    # scores whose second choice is right for both mistakes of P: top-2 accuracy 1.0
    scores = np.array([[.8, .1, .1], [.3, .6, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8], [.5, .1, .4]])
    m = evaluate.metrics(Y, P, NAMES, scores)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["daisy"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1-score": 1 / 2,
                                                     "support": 2})
    assert m["per_class"]["rose"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["tulip"] == pytest.approx({"precision": 1, "recall": 1 / 2, "f1-score": 2 / 3,
                                                     "support": 2})
    assert m["macro_avg"]["recall"] == pytest.approx(m["balanced_accuracy"])
    assert m["top_2_accuracy"] == 1.0
    worse = scores.copy()
    worse[5] = [.5, .4, .1]  # tulip now ranked last for the last image
    assert evaluate.metrics(Y, P, NAMES, worse)["top_2_accuracy"] == pytest.approx(5 / 6)
    json.dumps(m)  # plain JSON types only


def test_top_k_only_where_it_means_something():
    assert evaluate.top_k(2) is None and evaluate.top_k(3) == 2 and evaluate.top_k(5) == 3
    m = evaluate.metrics([0, 1, 1], [0, 1, 0], ["cat", "dog"], np.array([[.9, .1], [.2, .8], [.6, .4]]))
    assert not any(k.startswith("top_") for k in m)
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_unpredicted_class_and_summary_like_class_names():
    names = ["accuracy", "macro avg", "x"]
    m = evaluate.metrics([0, 1, 2], [0, 0, 0], names)
    assert m["per_class"]["macro avg"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 1}
    assert m["per_class"]["accuracy"]["recall"] == 1.0 and m["accuracy"] == pytest.approx(1 / 3)


def test_table_lists_classes_figures_and_confusion():
    m = evaluate.metrics(Y, P, NAMES, np.eye(3)[P])
    t = evaluate.table(m, "title line")
    lines = t.splitlines()
    assert lines[0] == "title line"
    assert any(l.split() == ["daisy", "0.500", "0.500", "0.500", "2"] for l in lines)
    assert "accuracy 0.6667" in t and "balanced accuracy 0.6667" in t and "top-2 accuracy" in t
    assert lines[-3].split() == ["daisy", "1", "1", "0"] and lines[-1].split() == ["tulip", "1", "0", "1"]


def test_json_and_pngs(tmp_path):
    m = {"test": evaluate.metrics(Y, P, NAMES)}
    history = {"loss": [1.0, .6, .5], "accuracy": [.4, .7, .8], "val_loss": [1.1, .8, .9], "val_accuracy": [.3, .6, .6]}
    paths = evaluate.write_reports(str(tmp_path / "r"), m, "dense", history)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == m
    assert json.loads((tmp_path / "r" / "history.json").read_text()) == history
    for name in ("confusion.png", "curves.png"):  # written when write_reports returns
        with Image.open(tmp_path / "r" / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150
    written = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert written == sorted(os.path.basename(p) for p in paths.values()) == ["confusion.png", "curves.png",
                                                                               "history.json", "metrics.json"]
