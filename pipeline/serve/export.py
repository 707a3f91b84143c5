"""``export``: the fine-tuned model or a saved head, end to end (raw RGB pixels -> the backbone's preprocessing
-> backbone -> pooling -> head), in a format Keras 3 exports (``Model.export``: tf_saved_model, onnx, litert,
openvino; or the native .keras file), verified before it is reported done.

A dense head becomes the fine-tune model without augmentation; a linear scikit-learn head (logreg, linear
SVM) one Dense layer holding its coefficients with the StandardScaler folded in (:func:`pipeline.serve.
keras_form.linear_model`); other scikit-learn heads have no Keras form and are refused.

Verification (:mod:`pipeline.serve.verify`): the artifact is loaded with its own runtime (Keras, TensorFlow,
onnxruntime, ai-edge-litert, OpenVINO) and run on up to ``VERIFY_IMAGES`` test images of the cache (or
``IMAGES``); its outputs must equal the Keras model's within ``TOLERANCE`` (max absolute difference, printed
and recorded). Only then is it put in place: exported into a temporary folder beside the destination, named
after its content (``<name>-<sha12>.onnx``, a folder ``<name>-<sha12>`` for SavedModel and OpenVINO) in one
rename, then the record ``<name>.json`` written atomically (the switch), then what the record no longer names
removed. The record carries the model's temperature and unknown-image threshold (``make head CALIBRATE``,
``REJECT_RECALL``), an ONNX file its ``metadata_props`` too.
"""

from __future__ import annotations

import datetime as dt
import os
import re

import keras

from pipeline import artifacts as saved, keras_internals, lock, records
from pipeline.backbones.extractor import compiled_call
from pipeline.configs import ExportConfig
from pipeline.errors import PipelineError, choose
from pipeline.serve import card, find, judge, open_export as exports, quantize, verify
from pipeline.serve.runner import EXPORT_FORMAT, HEAD_FORMAT, LINEAR_HEADS
from pipeline.serve.open_export import FORMATS, Format

RUNS = {  # how the record's user runs the artifact (x: float32 (N, size, size, 3) RGB pixels in 0..255)
    "keras": "keras.saving.load_model(file)(x)  (needs this package's layers: import pipeline.backbones.layers)",
    "tf_saved_model": "tf.saved_model.load(file).serve(x)",
    "onnx": "onnxruntime.InferenceSession(file).run(None, {'pixels': x})[0]",
    "litert": "ai_edge_litert.interpreter.Interpreter(file): resize_tensor_input, allocate_tensors, set_tensor, "
              "invoke, get_tensor",
    "openvino": "openvino.Core().compile_model(file + '/model.xml', 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})(x)[0]",
}
RUNTIME_PACKAGES = {"keras": "keras", "tensorflow": "tensorflow", "onnxruntime": "onnxruntime",
                    "ai_edge_litert": "ai-edge-litert", "openvino": "openvino"}
EXPORT_PACKAGES = ("tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "openvino")
CARRIED = ("temperature", "reject_threshold", "reject_score")  # of make head CALIBRATE / REJECT_RECALL


def out_paths(out: str, runner, fmt: Format, mode: str = "none") -> tuple[str, str]:
    """(folder, name) of the record ``<folder>/<name>.json``: ``OUT`` ending in .json is the record, another
    ``OUT`` a folder; by default ``<the model's folder>/export/`` and ``<model>-<format>[-<QUANTIZE>]``."""
    name = f"{runner.source.get('name') or 'model'}-{fmt.name}" + (f"-{mode}" if mode != "none" else "")
    if out.endswith(".json"):
        folder, name = os.path.dirname(os.path.abspath(out)), os.path.basename(out)[:-len(".json")]
        if not name:
            raise PipelineError(f"OUT={out}: name the record, e.g. OUT=dist/flowers.json, or a folder")
        return folder, name
    return (out or os.path.join(os.path.dirname(runner.path), "export")), name


def without_augmentation(model):
    """The fine-tuned model without its augmentation layers (inert in inference, but their random ops stay in
    the traced graph, which ONNX has no operator for): the same layers and weights after it, in a new model."""
    if "augment" not in [layer.name for layer in model.layers]:
        return model
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    x = inputs
    for layer in _chain(model):
        if layer.name != "augment":
            x = layer(x)
    return keras.Model(inputs, x, name=model.name)


def _chain(model) -> list:
    """The operations of ``model``'s graph in order when it is a chain (each called on the one before's output
    alone, from the model's one input to its one output), else a PipelineError."""
    nodes = [n for n in keras_internals.graph_nodes(model) if not n.is_input]
    x, chain = model.inputs[0], []
    while len(chain) < len(nodes):
        after = [n for n in nodes if len(n.input_tensors) == 1 and n.input_tensors[0] is x and len(n.outputs) == 1]
        if len(after) != 1:
            break
        chain.append(after[0].operation)
        x = after[0].outputs[0]
    if len(chain) != len(nodes) or len(model.inputs) != 1 or len(model.outputs) != 1 or model.outputs[0] is not x:
        raise PipelineError(f"{model.name}: not a chain of layers; cannot take its augmentation out")
    return chain


def stale(name: str):
    """The artifacts of ``name`` in any format and what killed exports left (staging folders, temporary records)."""
    exts = "|".join(re.escape(f.ext) for f in FORMATS.values() if f.ext)
    return re.compile(rf"{re.escape(name)}-[0-9a-f]{{12}}({exts})?|\.{re.escape(name)}\.[^/]*\.tmp")


def _refuse(head, path):
    return PipelineError(f"HEAD={head}: a {head} head has no Keras form, so it cannot be exported; heads that export: "
                         f"dense and the linear {', '.join(LINEAR_HEADS)} (and make finetune's model); it still "
                         f"labels images with make predict MODEL={path}")


def _refuse_early(rec_path):
    """What the record alone says cannot be exported, refused before any model is built."""
    try:
        rec = records.read_json(rec_path)
    except PipelineError:
        return  # open_model says what is wrong
    if not isinstance(rec, dict):
        return
    if rec.get("format") == HEAD_FORMAT and rec.get("kind") == "sklearn" and rec.get("head") not in LINEAR_HEADS:
        raise _refuse(rec.get("head"), rec_path)
    if rec.get("format") == EXPORT_FORMAT:
        raise PipelineError(f"{rec_path}: already an export ({rec.get('export_format')}); export the model it came "
                            f"from: MODEL={(rec.get('source') or {}).get('record', '...')}")


def _open(cfg: ExportConfig, log):
    """(format, runner) of the model ``MODEL`` names, after the options and what cannot be exported are refused."""
    fmt = choose(cfg.format, FORMATS, "export format")
    exports.need(fmt, (*fmt.export_needs, fmt.runtime))  # before anything is built
    quantize.check(fmt.name, cfg.quantize)
    if not cfg.tolerance > 0 or not cfg.score_tolerance > 0 or cfg.verify_images < 1 or cfg.batch < 1 \
            or cfg.representative < 1 or cfg.latency_runs < 1:
        raise PipelineError("TOLERANCE, SCORE_TOLERANCE, VERIFY_IMAGES, BATCH, REPRESENTATIVE and LATENCY_RUNS must "
                            "be positive")
    if not 0 <= cfg.min_accuracy <= 1 or not cfg.max_drop >= 0:
        raise PipelineError("MIN_ACCURACY is a fraction (0..1) and MAX_DROP points (>= 0)")
    src_path = find.find_model(cfg.model, cfg.models_dir, log=log)
    _refuse_early(src_path)
    runner = find.open_model(src_path, cfg.models_dir, log=log)
    if runner.kind == "export":
        raise PipelineError(f"{runner.path}: already an export ({runner.record['export_format']}); export the model "
                            f"it came from: MODEL={(runner.source or {}).get('record', '...')}")
    if runner.kind == "sklearn" and runner.record.get("head") not in LINEAR_HEADS:
        raise _refuse(runner.record.get("head"), runner.path)
    for note in runner.notes:
        log(f"note: {note}")
    return fmt, runner


def carried(runner) -> dict:
    """What predict applies on top of the artifact's outputs, from the model's record: ``temperature``,
    ``reject_threshold`` and ``reject_score`` where it has them (also in an ONNX file's ``metadata_props``)."""
    return {k: runner.record[k] for k in CARRIED if runner.record.get(k) is not None}


def judged(cfg: ExportConfig, runner, model, fmt: Format, name: str):
    """``(call, path) -> judgement`` on the whole test split, refusing an export below the floor; None when
    neither QUANTIZE, JUDGE, MIN_ACCURACY nor MAX_DROP asks for it."""
    if cfg.quantize == "none" and not cfg.judge and cfg.min_accuracy == 0 and cfg.max_drop >= 100:
        return None
    what = f"FORMAT={fmt.name} QUANTIZE={cfg.quantize}"
    pixels, labels = judge.test_set(runner, what)
    reference = verify.batched(compiled_call(model, runner.size, fold=False), pixels, cfg.batch)

    def run_(call, path):
        row = judge.judge(call, reference, pixels, labels, path, runner.output, cfg.latency_runs, cfg.batch)
        judge.check_floor(row, cfg.min_accuracy, cfg.max_drop, what)
        return {**row, "columns": list(judge.COLUMNS), "rows": judge.rows(name, row),
                "min_accuracy": cfg.min_accuracy, "max_drop": cfg.max_drop}

    return run_


def _record(runner, fmt: Format, path: str, sha: str, files: dict, verification: dict) -> dict:
    """The export's record: what the artifact is, takes and gives, how to run it, where it comes from."""
    src, n = runner.source, len(runner.classes)
    package = RUNTIME_PACKAGES[fmt.runtime]
    return {
        "format": EXPORT_FORMAT, "export_format": fmt.name, "file": os.path.basename(path), "sha256": sha,
        **({"files": files} if fmt.folder else {}), "bytes": saved.tree_bytes(path),
        "classes": list(runner.classes), "input_size": runner.size,
        "input": {"name": "pixels", "shape": [None, runner.size, runner.size, 3], "dtype": "float32",
                  "pixels": "RGB, 0..255 (uint8 values as float32)",
                  "resize": "the whole image to size x size, aspect not kept", "interpolation": runner.interpolation},
        "output": runner.output,
        "outputs": {"shape": [None, n if n > 2 else 1],
                    "meaning": ("class probabilities" if runner.output == "probability" else
                                "decision values (not probabilities)")
                    + ("; one unit for two classes: the second class's" if n == 2 else "")},
        "runtime": {"name": fmt.runtime, "package": package, "version": records.versions((package,))[package],
                    "run": RUNS[fmt.name], **({"config": exports.OPENVINO_CONFIG} if fmt.name == "openvino" else {})},
        "source": {"record": os.path.abspath(runner.path), "kind": runner.kind, "name": src.get("name"),
                   "head": runner.record.get("head"), "sha256": src.get("sha256"), "backbone": src.get("backbone"),
                   "cache_key": src.get("cache_key"), "cache_path": src.get("cache_path")},
        **carried(runner), "verification": verification,
        "versions": records.versions((*records.VERSIONED, *EXPORT_PACKAGES)),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run(cfg: ExportConfig, extra=None, log=print) -> str:
    """The ``export`` step: returns the record's path."""
    fmt, runner = _open(cfg, log)
    folder, name = out_paths(cfg.out, runner, fmt, cfg.quantize)
    records.writable_dir(folder, "OUT")
    original = runner.keras_model()
    model = without_augmentation(original)
    pixels, where = verify.verification_pixels(runner, cfg, log)
    rec_path = os.path.join(folder, name + ".json")
    judging = judged(cfg, runner, original, fmt, name)
    rep = judge.representative(runner, cfg.representative) if cfg.quantize in quantize.CALIBRATED else None
    with lock.locked(os.path.join(folder, ".export"), log=log):  # one export at a time into a folder
        path, sha, files, verification, judgement = verify.write_verified(
            model, fmt, folder, name, pixels, runner.size, cfg.tolerance, cfg.batch, reference_model=original,
            output=runner.output, score_tolerance=cfg.score_tolerance, metadata=carried(runner),
            mode=cfg.quantize, representative=rep, judged=judging)
        verification["on"] = where
        record = {**_record(runner, fmt, path, sha, files, verification), "quantize": _quantized(cfg, fmt),
                  **({"judgement": judgement} if judgement else {})}
        saved.switch(rec_path, record, stale(name), {os.path.basename(path)})  # until here the previous one stands
        card_path = card.write(rec_path, record)
    _report(runner, fmt, cfg, path, record, where, log)
    log(f"record: {rec_path}  (make predict MODEL={rec_path} IMAGES=...); model card: {card_path}")
    if record.get("judgement"):
        log(judge.table(record["judgement"]["rows"], record["judgement"]["cpu"]))
    return rec_path


def _quantized(cfg: ExportConfig, fmt: Format) -> dict:
    return {"mode": cfg.quantize, **({"how": quantize.HOW[fmt.name, cfg.quantize]} if cfg.quantize != "none" else {}),
            **({"representative_train_images": cfg.representative} if cfg.quantize in quantize.CALIBRATED else {})}


def _report(runner, fmt, cfg, path, record, where, log) -> None:
    verification, judgement = record["verification"], record.get("judgement")
    if cfg.quantize != "none":
        log(f"exported {runner.path} as {fmt.name} QUANTIZE={cfg.quantize}: {path} ({record['bytes'] / 2**20:.2f} "
            f"MiB); judged with {fmt.runtime} on {judgement['images']} test images: accuracy "
            f"{judgement['accuracy']:.4f} (float {judgement['float_accuracy']:.4f}), top-1 agrees on "
            f"{judgement['agreement']:.1%}")
        return
    log(f"exported {runner.path} as {fmt.name}: {path} ({record['bytes'] / 2**20:.1f} MiB); verified with "
        f"{fmt.runtime} on {where}: max abs difference {verification['max_abs_diff']:.2e} from the Keras model"
        + (f" ({verification['max_relative_diff']:.2e} of the largest decision value; SCORE_TOLERANCE "
           f"{cfg.score_tolerance:g})" if runner.output == "score" else f" (TOLERANCE {cfg.tolerance:g})")
        + f", top-1 agrees on {verification['argmax_agree']}/{verification['images']}")


def step(cfg: ExportConfig, extra=None) -> None:
    run(cfg, extra)
