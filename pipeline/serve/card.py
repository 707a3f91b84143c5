"""``<name>.MODEL_CARD.md``, written beside every export's record: what the model is, the data, its metrics, the
export's judgement, versions, limitations, and a runnable snippet that loads the artifact with its own runtime
and labels one image."""

from __future__ import annotations

import os

from pipeline import records
from pipeline.errors import PipelineError
from pipeline.reports import card as cards
from pipeline.serve import judge

LOAD = {  # (import, load, run on x) per export format
    "onnx": ("import onnxruntime", "model = onnxruntime.InferenceSession(ARTIFACT)",
             "p = model.run(None, {'pixels': x})[0][0]"),
    "litert": ("from ai_edge_litert.interpreter import Interpreter",
               "model = Interpreter(model_path=ARTIFACT)\nmodel.allocate_tensors()\n"
               "inp, out = model.get_input_details()[0], model.get_output_details()[0]",
               "if inp['dtype'] != np.float32:  # int8 input: the tensor's scale and zero point\n"
               "    x = np.clip(np.rint(x / inp['quantization'][0] + inp['quantization'][1]), -128, 127)"
               ".astype(inp['dtype'])\n"
               "model.set_tensor(inp['index'], x)\nmodel.invoke()\np = model.get_tensor(out['index'])[0]\n"
               "if out['dtype'] != np.float32:\n"
               "    p = (p.astype(np.float32) - out['quantization'][1]) * out['quantization'][0]"),
    "openvino": ("import openvino", "model = openvino.Core().compile_model(ARTIFACT + '/model.xml', 'CPU', "
                 "{'INFERENCE_PRECISION_HINT': 'f32'})", "p = model(x)[0][0]"),
    "keras": ("import keras\nimport pipeline.backbones.layers  # this package's two layers",
              "model = keras.saving.load_model(ARTIFACT, safe_mode=True)", "p = model(x, training=False).numpy()[0]"),
    "tf_saved_model": ("import tensorflow as tf", "model = tf.saved_model.load(ARTIFACT)",
                       "p = model.serve(tf.constant(x)).numpy()[0]"),
}
RESAMPLE = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS",
            "box": "BOX", "hamming": "HAMMING"}


def path_of(rec_path: str) -> str:
    return cards.path_of(rec_path)


def snippet(record: dict) -> str:
    """Python that labels ``IMAGE`` with the artifact, run from the card's folder, needing only its runtime,
    numpy and Pillow."""
    imports, load, call = LOAD[record["export_format"]]
    size, interp = record["input_size"], (record.get("input") or {}).get("interpolation", "bilinear")
    cut = 0.0 if record["output"] == "score" else 0.5
    lines = [
        "import numpy as np", "from PIL import Image", imports, "",
        f"ARTIFACT = {record['file']!r}", f"CLASSES = {record['classes']!r}", "IMAGE = 'photo.jpg'", "",
        "image = Image.open(IMAGE)",
        f"image.draft('RGB', ({size}, {size}))  # as the cache decoded JPEGs",
        f"image = image.convert('RGB').resize(({size}, {size}), Image.Resampling.{RESAMPLE.get(interp, 'BILINEAR')})",
        "x = np.asarray(image, np.float32)[None]  # (1, size, size, 3), RGB 0..255", load, call,
        f"best = int(p[0] > {cut}) if len(p) == 1 else int(np.argmax(p))  # one unit: the second class's",
        "print(CLASSES[best], float(np.max(p)))"]
    return "\n".join(lines)


def render(record: dict, source: dict) -> str:
    """The card's Markdown for an export ``record`` and its model's record ``source``."""
    src, q = record["source"], record.get("quantize") or {"mode": "none"}
    j = record.get("judgement")
    parts = [f"# Model card: {os.path.splitext(record['file'])[0]}", "",
             "## What it is", "",
             f"- a {src.get('head') or src.get('kind')} head ({src.get('kind')}) on the {src.get('backbone')} backbone, "
             f"end to end: pixels -> preprocessing -> backbone -> pooling -> head",
             f"- format {record['export_format']}, run with {record['runtime']['package']}; quantisation: {q['mode']}"
             + (f" ({q['how']})" if q.get("how") else ""),
             f"- classes ({len(record['classes'])}): {', '.join(record['classes'])}",
             f"- input `pixels`: float32 (N, {record['input_size']}, {record['input_size']}, 3), RGB 0..255, the "
             f"whole image resized ({record['input'].get('interpolation')}, aspect not kept); output: "
             f"{record['outputs']['meaning']}",
             f"- cache key `{src.get('cache_key')}`; source record `{src.get('record')}`", "",
             "## Data", "", *cards.data(src.get("cache_path"), src.get("cache_key"), cards.reports_dir(source)), "",
             "## Metrics", "", *cards.metrics(source, record, applied="make predict; the artifact outputs uncalibrated probabilities"), "", "## Export judgement", "",
             (judge.table(j["rows"], j["cpu"]) if j else f"Not judged on the whole test split (JUDGE=1 to); verified on "
              f"{record['verification'].get('on')} against the Keras model, max difference "
              f"{record['verification'].get('max_abs_diff', 0):.2e}."), "",
             "## Versions", "", ", ".join(f"{k} {v}" for k, v in sorted(record["versions"].items()) if v), "",
             "## Limitations", "",
             "- Trained and judged on the images above only; photos unlike them (other classes, framing, lighting) "
             "get one of these labels all the same" + (", unless below the unknown-image threshold." if
                                                       record.get("reject_threshold") is not None else "."),
             "- Small test splits give coarse accuracies; quantised models may disagree with the float one on "
             "borderline images (see the agreement).", "",
             "## Run it", "", "From this folder, with only its runtime, numpy and Pillow:", "",
             "```python", snippet(record), "```", ""]
    return "\n".join(parts)


def write(rec_path: str, record: dict) -> str:
    """Write the card of the export at ``rec_path`` (atomically); returns its path."""
    try:
        source = records.read_json(record["source"]["record"])
    except (PipelineError, OSError):
        source = {}
    path = path_of(rec_path)
    records.atomic_write_text(path, render(record, source if isinstance(source, dict) else {}))
    return path
