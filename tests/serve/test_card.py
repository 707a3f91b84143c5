"""``MODEL_CARD.md`` beside every export: what the model is, its data and metrics, the judgement table, and a
snippet that, extracted from the card and run with only the artifact's runtime, labels an image as predict does."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from test_predict import cached_scores, flowers_models

from pipeline.configs import ExportConfig
from pipeline.serve import card, export, find

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return flowers_models(tmp_path_factory.mktemp("flowers"), {"logreg": {}})


@pytest.mark.parametrize("fmt,mode", [("onnx", "none"), ("litert", "int8"), ("litert", "int8_io"), ("openvino", "none")])
def test_the_cards_snippet_labels_an_image_with_the_artifact_alone(flowers, fmt, mode, tmp_path):
    cache_path, recs, _ = flowers
    rec_path = export.run(ExportConfig(model=recs["logreg"], format=fmt, quantize=mode, out=str(tmp_path),
                                       latency_runs=1), log=lambda m: None)
    rec = json.loads(open(rec_path).read())
    text = open(card.path_of(rec_path)).read()
    assert text.startswith(f"# Model card: {os.path.splitext(rec['file'])[0]}")
    for part in ("## What it is", "mobilenet_v2 backbone", f"cache key `{rec['source']['cache_key']}`",
                 "| class | train | val | test |", "| daisy |", "Test accuracy of the model", "## Versions",
                 "## Limitations", f"quantisation: {mode}"):
        assert part in text, part
    assert (mode == "none") != ("| float32 Keras (reference) |" in text)  # the judgement table of a judged export
    if rec.get("reject_threshold") is not None:
        assert "Unknown-image threshold on the maximum probability" in text
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    files, names, _ = cached_scores(recs["logreg"], cache_path)
    image = files[0]
    code = code.replace("IMAGE = 'photo.jpg'", f"IMAGE = {image!r}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the runtime alone, not this package
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    label, prob = out.stdout.split()[-2:]
    from pipeline.data import images

    want = find.open_model(rec_path).call(images.load_resized(image, rec["input_size"])[None])[0]
    assert label == rec["classes"][int(np.argmax(want))] and float(prob) == pytest.approx(float(np.max(want)),
                                                                                         abs=1e-4)
