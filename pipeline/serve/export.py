"""``export``: the fine-tuned model or a saved head, end to end (raw RGB pixels -> the backbone's preprocessing
-> backbone -> pooling -> head), in a format Keras 3 exports (``Model.export``: tf_saved_model, onnx, litert,
openvino; or the native .keras file), verified before it is reported done.

A dense head becomes the fine-tune model without augmentation; a linear scikit-learn head (logreg, linear
SVM) one Dense layer holding its coefficients with the StandardScaler folded in (:func:`pipeline.serve.predict.
linear_model`); other scikit-learn heads have no Keras form and are refused.

Verification: the artifact is loaded with its own runtime (Keras, TensorFlow, onnxruntime, ai-edge-litert,
OpenVINO) and run on up to ``VERIFY_IMAGES`` test images of the cache (or ``IMAGES``); its outputs must equal
the Keras model's within ``TOLERANCE`` (max absolute difference, printed and recorded). Only then is it put in
place: exported into a temporary folder beside the destination, named after its content
(``<name>-<sha12>.onnx``, a folder ``<name>-<sha12>`` for SavedModel and OpenVINO) in one rename, then the
record ``<name>.json`` written atomically (the switch), then what the record no longer names removed.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
import warnings

import numpy as np

from pipeline import artifacts as saved, keras_internals, records
from pipeline.serve import predict
from pipeline.configs import ExportConfig
from pipeline.data import images
from pipeline.errors import PipelineError, choose
from pipeline.serve import find, open_export as exports, runner as base
from pipeline.serve.runner import EXPORT_FORMAT, LINEAR_HEADS
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


def out_paths(out: str, runner, fmt: Format) -> tuple[str, str]:
    """(folder, name) of the record ``<folder>/<name>.json``: ``OUT`` ending in .json is the record, another
    ``OUT`` a folder; by default ``<the model's folder>/export/`` and ``<model>-<format>``."""
    name = f"{runner.source.get('name') or 'model'}-{fmt.name}"
    if out.endswith(".json"):
        folder, name = os.path.dirname(os.path.abspath(out)), os.path.basename(out)[:-len(".json")]
        if not name:
            raise PipelineError(f"OUT={out}: name the record, e.g. OUT=dist/flowers.json, or a folder")
        return folder, name
    return (out or os.path.join(os.path.dirname(runner.path), "export")), name


def verification_pixels(runner, cfg: ExportConfig, log=print) -> tuple[np.ndarray, str]:
    """(uint8 pixels, where they come from): up to ``VERIFY_IMAGES`` of the given ``IMAGES``, else of the test
    split of the cache the model was made from, else (no cache) seeded random pixels, said so."""
    n, size, interp = cfg.verify_images, runner.size, runner.interpolation
    if cfg.images:
        files, problems, _ = predict.image_paths(predict.split_images(cfg.images))
        got = []
        for _, pixels, _ in predict.decode_batches(files, size, interp, cfg.batch, runner.max_pixels):
            if pixels is not None:
                got.append(pixels)
            if sum(len(p) for p in got) >= n:
                break
        if not got:
            raise PipelineError(f"IMAGES={cfg.images}: no readable image to verify the export on")
        x = np.concatenate(got)[:n]
        return x, f"{len(x)} given image(s)"
    cache_path, key = runner.source.get("cache_path"), runner.source.get("cache_key")
    if cache_path and os.path.exists(cache_path):
        x = cache_test_pixels(cache_path, key, n, size, interp, runner.max_pixels)
        if len(x):
            return x, f"{len(x)} test image(s) of {os.path.basename(cache_path)}"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (min(n, 16), size, size, 3), dtype=np.uint8)
    log(f"note: the cache {cache_path} is gone: verifying on {len(x)} seeded random images (IMAGES=... to give some)")
    return x, f"{len(x)} seeded random image(s) (the cache is gone)"


def cache_test_pixels(cache_path, key, n, size, interpolation, max_pixels=images.MAX_PIXELS) -> np.ndarray:
    """Up to ``n`` test images of a cache, decoded as for the cache (built-in sources made again)."""
    from pipeline.cache import store
    from pipeline.data import sources

    cache = store.load(cache_path, expect_key=key)
    split = cache.splits.get("test") or next(iter(cache.splits.values()))
    rels = list(split.paths[:n])
    cfg = cache.config
    if cfg.get("data") in sources.BUILTIN:
        ds = sources.open_source(cfg["data"], cfg.get("val_fraction", 0.15), cfg.get("test_fraction", 0.15),
                                 cfg.get("seed", 0), cfg.get("per_class", 0), progress=False)
        where = {it.relpath: i for i, it in enumerate(ds.items)}
        sources_ = [ds.source(where[r]) for r in rels if r in where]
    else:
        root = cfg.get("source_root") or cfg.get("data")
        sources_ = [os.path.join(root, r) for r in rels]
    out = []
    for s in sources_:
        try:
            out.append(images.load_resized(s, size, interpolation, max_pixels))
        except (images.BadImage, OSError):
            continue  # changed since the cache was made: verified on the others
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def without_augmentation(model):
    """The fine-tuned model without its augmentation layers (inert in inference, but their random ops stay in
    the traced graph, which ONNX has no operator for): the same layers and weights after it, in a new model."""
    import keras

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


def _batched(call, x, batch):
    return np.concatenate([np.asarray(call(x[i:i + batch])) for i in range(0, len(x), batch)])


def _export(model, fmt: Format, target: str, signature) -> None:
    """``model`` written as ``fmt`` at ``target`` by Keras itself: ``Model.save`` or ``Model.export``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*np.object.*", category=FutureWarning)  # Keras' tf2onnx patch
        if fmt.name == "keras":
            model.save(target)
        elif fmt.name == "openvino":  # an .xml and its .bin: one folder, switched into place whole
            os.mkdir(target)
            model.export(os.path.join(target, "model.xml"), format="openvino", verbose=False,
                         input_signature=signature)
        else:
            model.export(target, format=fmt.name, verbose=False, input_signature=signature)


def write_verified(model, fmt: Format, folder: str, name: str, pixels: np.ndarray, size: int, tolerance: float,
                   batch: int = 32, log=print, reference_model=None, output="probability",
                   score_tolerance: float = 1e-3) -> tuple[str, str, dict, dict]:
    """(artifact path, sha256, {file: sha256} of a folder, verification) of ``model`` exported as ``fmt`` into a
    temporary folder in ``folder``, loaded back with its runtime, compared on ``pixels`` with the Keras model
    (``reference_model``, default ``model``) and only then renamed into place as ``<name>-<sha12><ext>``.

    Probabilities may differ by ``tolerance`` at most. Decision values (``output="score"``) are unbounded and
    amplify float rounding in the features by the coefficients (the scaler's 1/std): their difference is taken
    relative to the largest |value| (at least 1), up to ``score_tolerance``."""
    import tensorflow as tf

    from pipeline.backbones.extractor import compiled_call

    reference = _batched(compiled_call(reference_model or model, size, fold=False), pixels, batch)  # as built
    with saved.staging(folder, name) as work:
        target = os.path.join(work, "artifact" + fmt.ext)
        t0 = time.perf_counter()
        signature = [tf.TensorSpec((None, size, size, 3), tf.float32, name="pixels")]
        try:
            _export(model, fmt, target, signature)
        except (ImportError, ModuleNotFoundError) as e:
            raise PipelineError(f"FORMAT={fmt.name}: Keras' exporter needs {e.name or e}: pip install "
                                f"'pipeline[{fmt.extra or fmt.name}]'") from None
        export_secs = time.perf_counter() - t0
        t0 = time.perf_counter()
        call = exports.runtime(fmt, target, size, fold=False)
        got = _batched(lambda x: call(x.astype(np.float32)), pixels, batch)
        verify_secs = time.perf_counter() - t0
        if got.shape != reference.shape:
            raise PipelineError(f"FORMAT={fmt.name}: the artifact gives {got.shape[1:]} per image, the Keras model "
                                f"{reference.shape[1:]}; not saved")
        diff = float(np.max(np.abs(got.astype(np.float64) - reference))) if len(got) else 0.0
        agree = int(np.sum(base.expand(got).argmax(1) == base.expand(reference).argmax(1)))
        scale = max(1.0, float(np.max(np.abs(reference)))) if len(reference) else 1.0
        relative = diff / scale
        if output == "score" and not relative <= score_tolerance:
            raise PipelineError(f"FORMAT={fmt.name}: the artifact's decision values differ from the Keras model's by "
                                f"up to {diff:.3g} ({relative:.3g} of the largest) on {len(pixels)} images "
                                f"(SCORE_TOLERANCE={score_tolerance:g}); not saved")
        if output != "score" and not diff <= tolerance:
            raise PipelineError(f"FORMAT={fmt.name}: the artifact's outputs differ from the Keras model's by up to "
                                f"{diff:.3g} on {len(pixels)} images (TOLERANCE={tolerance:g}); not saved")
        sha, files = saved.tree_digest(target)
        final = os.path.join(folder, f"{name}-{sha[:12]}{fmt.ext}")
        saved.put(target, final, sha)  # one step: a folder appears whole
    verification = {"images": int(len(pixels)), "max_abs_diff": diff,
                    **({"max_relative_diff": relative, "score_tolerance": score_tolerance} if output == "score"
                       else {"tolerance": tolerance}),
                    "argmax_agree": agree, "reference": "the Keras model, float32, BatchNorm as built (not folded)",
                    "export_seconds": round(export_secs, 3), "verify_seconds": round(verify_secs, 3)}
    return final, sha, files, verification


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
    if rec.get("format") == base.HEAD_FORMAT and rec.get("kind") == "sklearn" and rec.get("head") not in LINEAR_HEADS:
        raise _refuse(rec.get("head"), rec_path)
    if rec.get("format") == EXPORT_FORMAT:
        raise PipelineError(f"{rec_path}: already an export ({rec.get('export_format')}); export the model it came "
                            f"from: MODEL={(rec.get('source') or {}).get('record', '...')}")


def run(cfg: ExportConfig, extra=None, log=print) -> str:
    """The ``export`` step: returns the record's path."""
    from pipeline import lock

    fmt = choose(cfg.format, FORMATS, "export format")
    exports.need(fmt, (*fmt.export_needs, fmt.runtime))  # before anything is built
    if not cfg.tolerance > 0 or not cfg.score_tolerance > 0 or cfg.verify_images < 1 or cfg.batch < 1:
        raise PipelineError("TOLERANCE, SCORE_TOLERANCE, VERIFY_IMAGES and BATCH must be positive")
    src_path = find.find_model(cfg.model, cfg.models_dir, log=log)
    _refuse_early(src_path)
    runner = find.open_model(src_path, cfg.models_dir, log=log)
    if runner.kind == "export":
        raise PipelineError(f"{runner.path}: already an export ({runner.record['export_format']}); export the model "
                            f"it came from: MODEL={(runner.source or {}).get('record', '...')}")
    head = runner.record.get("head")
    if runner.kind == "sklearn" and head not in LINEAR_HEADS:
        raise _refuse(head, runner.path)
    for note in runner.notes:
        log(f"note: {note}")
    folder, name = out_paths(cfg.out, runner, fmt)
    records.writable_dir(folder, "OUT")
    original = runner.keras_model()
    model = without_augmentation(original)
    pixels, where = verification_pixels(runner, cfg, log)
    rec_path = os.path.join(folder, name + ".json")
    with lock.locked(os.path.join(folder, ".export"), log=log):  # one export at a time into a folder
        path, sha, files, verification = write_verified(model, fmt, folder, name, pixels, runner.size,
                                                        cfg.tolerance, cfg.batch, log, reference_model=original,
                                                        output=runner.output, score_tolerance=cfg.score_tolerance)
        verification["on"] = where
        src = runner.source
        ver = records.versions((*records.VERSIONED, *EXPORT_PACKAGES))
        record = {
            "format": EXPORT_FORMAT, "export_format": fmt.name, "file": os.path.basename(path), "sha256": sha,
            **({"files": files} if fmt.folder else {}), "bytes": saved.tree_bytes(path),
            "classes": list(runner.classes), "input_size": runner.size,
            "input": {"name": "pixels", "shape": [None, runner.size, runner.size, 3], "dtype": "float32",
                      "pixels": "RGB, 0..255 (uint8 values as float32)",
                      "resize": "the whole image to size x size, aspect not kept",
                      "interpolation": runner.interpolation},
            "output": runner.output,
            "outputs": {"shape": [None, len(runner.classes) if len(runner.classes) > 2 else 1],
                        "meaning": ("class probabilities" if runner.output == "probability" else
                                    "decision values (not probabilities)")
                        + ("; one unit for two classes: the second class's" if len(runner.classes) == 2 else "")},
            "runtime": {"name": fmt.runtime, "package": RUNTIME_PACKAGES[fmt.runtime],
                        "version": records.versions((RUNTIME_PACKAGES[fmt.runtime],))[RUNTIME_PACKAGES[fmt.runtime]],
                        "run": RUNS[fmt.name],
                        **({"config": exports.OPENVINO_CONFIG} if fmt.name == "openvino" else {})},
            "source": {"record": os.path.abspath(runner.path), "kind": runner.kind, "name": src.get("name"),
                       "head": head, "sha256": src.get("sha256"), "backbone": src.get("backbone"),
                       "cache_key": src.get("cache_key"), "cache_path": src.get("cache_path")},
            "verification": verification, "versions": ver,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        saved.switch(rec_path, record, stale(name), {os.path.basename(path)})  # until here the previous one stands
    log(f"exported {runner.path} as {fmt.name}: {path} ({record['bytes'] / 2**20:.1f} MiB); verified with "
        f"{fmt.runtime} on {where}: max abs difference {verification['max_abs_diff']:.2e} from the Keras model"
        + (f" ({verification['max_relative_diff']:.2e} of the largest decision value; SCORE_TOLERANCE "
           f"{cfg.score_tolerance:g})" if runner.output == "score" else f" (TOLERANCE {cfg.tolerance:g})")
        + f", top-1 agrees on {verification['argmax_agree']}/{verification['images']}")
    log(f"record: {rec_path}  (make predict MODEL={rec_path} IMAGES=...)")
    return rec_path


def step(cfg: ExportConfig, extra=None) -> None:
    run(cfg, extra)
