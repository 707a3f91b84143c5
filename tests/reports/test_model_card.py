"""``MODEL_CARD.md`` beside every head record and fine-tuned model: its sections, and a snippet that, extracted
from the card and run in a fresh process, labels an image with this package's ``pipeline.predict``."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, make_tree

from pipeline import cli, records
from pipeline.configs import FinetuneConfig
from pipeline.reports import card

pytestmark = pytest.mark.slow
TINY = ["BACKBONE=mobilenet_v2", "ALPHA=0.35", "WEIGHTS=none", "SIZE=32"]


def _check_card(rec_path, image, kind_line):
    text = open(card.path_of(rec_path)).read()
    rec = records.read_json(rec_path)
    for part in ("# Model card:", "## What it is", kind_line, "backbone mobilenet_v2", "input size 32",
                 f"cache key `{rec['cache_key']}`", "## Data", "| class | train | val | test |", "| cat |",
                 "## Metrics", "Test accuracy of", "## Versions", "## Limitations", "## Run it"):
        assert part in text, part
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace("IMAGE = 'photo.jpg'", f"IMAGE = {image!r}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=os.path.dirname(image))
    assert out.returncode == 0, out.stderr[-2000:]
    label, prob = out.stdout.split()[-2:]
    assert label in ("cat", "dog") and 0 <= float(prob) <= 1


def test_a_heads_card_has_its_sections_and_its_snippet_labels_an_image(tmp_path):
    tree = make_tree(tmp_path / "data")
    args = ["head", f"DATA={tree}", *TINY, "HEAD=logreg", f"CACHE_DIR={tmp_path / 'cache'}",
            f"MODELS_DIR={tmp_path / 'models'}", f"REPORTS_DIR={tmp_path / 'reports'}"]
    assert cli.main(args) == 0
    [rec_path] = [str(p) for p in (tmp_path / "models").glob("*/logreg.json")]
    _check_card(rec_path, str(tree / "cat" / "cat_000.jpg"), "a logreg head (sklearn)")
    assert "No audit of this cache was found" in open(card.path_of(rec_path)).read()

    assert cli.main(["audit", f"DATA={tree}", *TINY, f"CACHE_DIR={tmp_path / 'cache'}",
                     f"REPORTS_DIR={tmp_path / 'reports'}", "FOLDS=2"]) == 0
    assert cli.main(args) == 0  # the head again: its card now says what the audit flagged
    text = open(card.path_of(rec_path)).read()
    assert "What the audit flagged" in text and "No audit" not in text
    for section in ("- label issues: ", "- duplicates and leaks: ", "- outliers: ", "- class balance: "):
        assert section in text, section


def test_a_fine_tuned_models_card_has_its_sections_and_its_snippet_labels_an_image(tmp_path):
    from pipeline import finetune

    tree = make_tree(tmp_path / "data")
    cfg = FinetuneConfig(data=str(tree), backbone="mobilenet_v2", weights="none", alpha=0.35, size=32,
                         batch=8, cache_dir=str(tmp_path / "cache"), models_dir=str(tmp_path / "models"),
                         reports_dir=str(tmp_path / "reports"), finetune_epochs=1, verbose=0)
    finetune.run(cfg, {"EPOCHS": "2"}, log=lambda m: None)
    [rec_path] = [str(p) for p in (tmp_path / "models").glob("*/finetune.json")]
    _check_card(rec_path, str(tree / "dog" / "dog_000.jpg"), "a fine-tuned model (make finetune)")
