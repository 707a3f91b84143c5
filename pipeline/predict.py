"""``predict``: label image files and folders with any model this program saves, each loaded only after its
record checks out:

- the fine-tuned model (:mod:`pipeline.finetune.artifact`);
- a dense head, as one end-to-end Keras model: raw pixels -> the backbone's preprocessing -> backbone ->
  the cache's pooling -> the head (the fine-tune model without augmentation);
- a scikit-learn head, on the features of the new images from the extractor of ``make features``, rebuilt
  from the cache's record and checked against it (the weights digest);
- an exported artifact (``make export``: .keras, SavedModel, ONNX, LiteRT, OpenVINO), run by its own runtime.

Whatever the model, a :class:`Runner` maps uint8 (N, size, size, 3) pixel batches to per-class scores.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import importlib.util
import os
import re
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline import records
from pipeline.configs import FeaturesConfig, PredictConfig, asdict
from pipeline.data import images
from pipeline.data.loading import cores
from pipeline.errors import PipelineError
from pipeline.finetune import artifact
from pipeline.heads import artifacts

FINETUNE_FORMAT, HEAD_FORMAT, EXPORT_FORMAT = artifact.FORMAT, artifacts.FORMAT, "pipeline-export/1"
SHA12 = re.compile(r"-[0-9a-f]{12}$")
LINEAR_HEADS = ("logreg", "linear_svm")  # scikit-learn heads that become one Dense layer


# --- a model, whatever it is, as a call on pixel batches -------------------------------------------------------

@dataclass
class Runner:
    """A loaded model ready to label pixels: ``call(uint8 (N, size, size, 3))`` gives its raw outputs, ``scores``
    one column per class (``output``: ``probability``, or ``score`` for decision values)."""

    path: str  # the record
    record: dict
    kind: str  # finetune | dense | sklearn | export
    classes: list
    size: int
    interpolation: str
    output: str  # probability | score
    call: object
    notes: list = field(default_factory=list)
    keras_model: object = None  # () -> the end-to-end Keras model, float32, as built (what make export exports)
    source: dict = field(default_factory=dict)  # what the record says about its backbone and cache
    max_pixels: int = images.MAX_PIXELS

    def scores(self, pixels) -> np.ndarray:
        return expand(np.asarray(self.call(pixels)), self.output)


def expand(raw, output="probability") -> np.ndarray:
    """(N, n_classes) float64 of a model's raw outputs: one sigmoid unit -> (1 - p, p), one decision value
    -> (-s, s), as the heads rank them (:func:`pipeline.heads.registry.scores`)."""
    p = np.asarray(raw, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if p.shape[1] == 1:
        p = np.hstack([-p, p] if output == "score" else [1.0 - p, p])
    return p


def _record_format(path):
    try:
        rec = records.read_json(path)
    except PipelineError:
        return None
    return rec.get("format") if isinstance(rec, dict) else None


def _newest(paths):
    return sorted(paths, key=os.path.getmtime)[-1] if paths else None


def default_model(models_dir="models", log=print) -> str:
    """The newest fine-tuned model (``<models>/*/finetune.json``), else the best head of the newest sweep
    (``<models>/*/best.json``), else the newest head record."""
    tuned = glob.glob(os.path.join(models_dir, "*", artifact.RECORD))
    if tuned:
        if len(tuned) > 1:
            log(f"using the newest of {len(tuned)} fine-tuned models: {_newest(tuned)} (MODEL=path to choose)")
        return _newest(tuned)
    best = [p for p in glob.glob(os.path.join(models_dir, "*", "best.json")) if _record_format(p) == HEAD_FORMAT]
    if best:
        log(f"no fine-tuned model: using the best head of the last sweep, {_newest(best)} (MODEL=path to choose)")
        return _newest(best)
    heads = [p for p in glob.glob(os.path.join(models_dir, "*", "*.json")) if _record_format(p) == HEAD_FORMAT]
    if heads:
        log(f"no fine-tuned model nor sweep: using the newest head, {_newest(heads)} (MODEL=path to choose)")
        return _newest(heads)
    raise PipelineError(f"no model under {models_dir}/ (no fine-tuned model, sweep or head): run make finetune, "
                        "make sweep or make head, or pass MODEL=path")


def find_model(path: str = "", models_dir: str = "models", log=print) -> str:
    """The record of ``path``: a record (.json), a model file or folder beside its record (finetune-<sha12>.keras,
    <head>-<sha12>.joblib, an exported artifact), a folder holding finetune.json or exactly one record; when
    empty, :func:`default_model`."""
    if not path:
        return default_model(models_dir, log)
    path = path.rstrip(os.sep) or path
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, artifact.RECORD)):
            return os.path.join(path, artifact.RECORD)
        beside = record_beside(path)
        if SHA12.search(os.path.basename(path)) and os.path.exists(beside):  # a SavedModel / OpenVINO export
            return beside
        return artifacts.find_record(path)
    parent = os.path.dirname(path)
    if path.endswith((".xml", ".bin", ".pb")) and SHA12.search(os.path.basename(parent)):
        return record_beside(parent)  # a file inside an exported folder
    if not path.endswith(".json"):
        return record_beside(path)
    return path


def record_beside(path: str) -> str:
    """The record of a model file or exported folder: ``<name>-<sha12>[.ext]`` (or a legacy ``<name>.ext``) ->
    ``<name>.json`` beside it."""
    name = os.path.basename(path.rstrip(os.sep))
    stem = name if os.path.isdir(path) else os.path.splitext(name)[0]
    return os.path.join(os.path.dirname(path.rstrip(os.sep)), SHA12.sub("", stem) + ".json")


def open_model(path: str = "", models_dir: str = "models", log=print, fold=True) -> Runner:
    """The :class:`Runner` of a model record (or anything :func:`find_model` takes), after its record checks out.
    ``fold``: Keras models run with BatchNorm folded into the convolutions (the cache's way)."""
    rec_path = find_model(path, models_dir, log)
    if not os.path.exists(rec_path):
        raise PipelineError(f"{rec_path}: no such model record; run make finetune, make head or make export, "
                            "or pass MODEL=path")
    rec = records.read_json(rec_path)
    fmt = rec.get("format") if isinstance(rec, dict) else None
    if fmt == FINETUNE_FORMAT:
        return _finetuned(rec_path, fold)
    if fmt == HEAD_FORMAT:
        return _head(rec_path, log, fold)
    if fmt == EXPORT_FORMAT:
        return open_export(rec_path)
    raise PipelineError(f"{rec_path}: not a model record of this program (a fine-tuned model, a head or an "
                        "export)")


def _finetuned(rec_path, fold):
    from pipeline.backbones.extractor import compiled_call

    model, rec = artifact.load(rec_path)
    size = int(rec["input_size"])
    cfg = rec.get("config") or {}
    return Runner(rec_path, rec, "finetune", list(rec["classes"]), size,
                  (rec.get("input") or {}).get("interpolation", "bilinear"), "probability",
                  compiled_call(model, size, fold=fold), keras_model=lambda: model,
                  source={"name": "finetune", "backbone": rec.get("backbone"), "cache_path": rec.get("cache_path"),
                          "cache_key": rec.get("cache_key"), "features": cfg.get("features"),
                          "sha256": rec["sha256"]},
                  max_pixels=int((cfg.get("features") or {}).get("max_pixels") or images.MAX_PIXELS))


# --- heads: the extractor of the cache, rebuilt and checked ----------------------------------------------------

def cache_config(rec: dict, rec_path: str) -> tuple[dict, dict | None, str | None]:
    """(features options, the cache's identity or None, a note or None) of a head record: the cache file's own
    record when the file is there (and is the cache the head was trained on), else the head record's options,
    said so in the note."""
    from pipeline.cache import store

    cache_path = rec.get("cache_path") or ""
    if cache_path and os.path.exists(cache_path):
        try:
            meta = store.check_header(cache_path, expect_key=rec.get("cache_key"))
        except PipelineError as e:
            problem = f"its cache cannot be read ({e})"
        else:
            cfg = meta["config"]
            return {**asdict(FeaturesConfig()), **cfg}, cfg.get("identity"), None
    else:
        problem = f"its cache {cache_path or '(none recorded)'} is gone"
    config = rec.get("config") or {}
    if config.get("cache"):
        raise PipelineError(f"{rec_path}: {problem}, and the head was trained on CACHE={config['cache']}, so its "
                            "record does not say how the features were made; restore the cache file or retrain "
                            "the head with make head")
    return ({**asdict(FeaturesConfig()), **{k: v for k, v in config.items() if k in asdict(FeaturesConfig())}},
            None, f"{problem}: the extractor is rebuilt from the head record's options, and its weights cannot "
                  "be checked against the cache")


def rebuild_extractor(fc: dict, identity: dict | None, where: str, precision: str | None = None):
    """(spec, size, extractor, base) of the features options ``fc``: the extractor of ``make features``, with
    the weights file the cache recorded. With the cache's ``identity`` the weights digest must be the one the
    cache was made with."""
    from pipeline.backbones import extractor
    from pipeline.backbones import registry as backbones

    records.use_keras_home(fc.get("keras_home") or "")
    spec = backbones.get(fc["backbone"])
    size = backbones.resolve_size(spec, fc.get("size"))
    recorded = (identity or {}).get("weights") or {}
    weights = fc["weights"]
    if recorded.get("source") == "file" and recorded.get("file"):
        weights = recorded["file"]  # the absolute path the cache was made from
    try:
        model, base = extractor.build(spec, size, weights, fc["pooling"], alpha=fc.get("alpha") or None,
                                      seed=int(fc.get("seed") or 0), precision=precision or fc.get("precision")
                                      or "float32", keras_home=fc.get("keras_home") or "")
    except PipelineError as e:
        raise PipelineError(f"{where}: cannot rebuild its {spec.name} extractor: {e}") from None
    if identity:
        sha = backbones.weights_digest(base)
        if sha != recorded.get("sha256"):
            raise PipelineError(f"{where}: the rebuilt {spec.name} extractor has other weights (sha256 {sha[:12]}) "
                                f"than the cache was made with ({str(recorded.get('sha256'))[:12]}): WEIGHTS="
                                f"{weights} changed since; rerun make features and retrain the head")
        if identity.get("size") not in (None, size) or identity.get("pooling") not in (None, fc["pooling"]):
            raise PipelineError(f"{where}: the cache's record disagrees with its options (size, pooling)")
    return spec, size, model, base


def _head(rec_path, log, fold):
    from pipeline.backbones.extractor import compiled_call
    from pipeline.finetune.model import build_model
    from pipeline.heads import registry

    rec, _ = artifacts.check(rec_path)  # the file's sha256 and the versions, before anything is built or unpickled
    names = rec.get("class_names") or []
    try:
        classes = [names[int(c)] for c in rec["classes"]]
    except (IndexError, TypeError, ValueError, KeyError):
        raise PipelineError(f"{rec_path}: its classes and class names disagree; retrain with make head") from None
    fc, identity, note = cache_config(rec, rec_path)
    spec, size, extractor_model, base = rebuild_extractor(fc, identity, rec_path)
    est, rec = artifacts.load(rec_path, expect_key=rec.get("cache_key"))
    dim = int(extractor_model.output_shape[-1])
    wants = int(getattr(est, "n_features_in_", dim))
    if wants != dim:
        raise PipelineError(f"{rec_path}: takes {wants} features, its rebuilt {spec.name} extractor gives {dim}; "
                            "retrain it with make head")
    fold = bool(fc.get("fold_batchnorm", True)) and fold
    src = {"name": rec.get("name"), "head": rec.get("head"), "backbone": spec.name, "cache_path": rec.get("cache_path"),
           "cache_key": rec.get("cache_key"), "features": fc, "identity": identity, "sha256": rec["sha256"]}
    common = dict(notes=[note] if note else [], source=src, max_pixels=int(fc.get("max_pixels") or images.MAX_PIXELS))
    interp = fc.get("interpolation") or "bilinear"
    if rec["kind"] == "keras":
        model = build_model(spec, size, base, fc["pooling"], est.model_, augment=None)

        def keras_model():
            if (fc.get("precision") or "float32") == "float32":
                return model
            _, _, _, base32 = rebuild_extractor(fc, identity, rec_path, precision="float32")
            return build_model(spec, size, base32, fc["pooling"], est.model_, augment=None)

        return Runner(rec_path, rec, "dense", classes, size, interp, "probability",
                      compiled_call(model, size, fold=fold), keras_model=keras_model, **common)
    features = compiled_call(extractor_model, size, fold=fold)
    dtype = fc.get("dtype") or "float32"

    def call(pixels):
        return registry.scores(est, np.asarray(features(pixels)).astype(dtype))  # as stored in the cache

    def keras_model():
        base32 = base
        if (fc.get("precision") or "float32") != "float32":  # exported in float32 (the weights are float32)
            base32 = rebuild_extractor(fc, identity, rec_path, precision="float32")[3]
        return linear_model(est, rec, spec, size, base32, fc["pooling"])

    return Runner(rec_path, rec, "sklearn", classes, size, interp,
                  "probability" if hasattr(est, "predict_proba") else "score", call, keras_model=keras_model, **common)


def linear_model(est, rec, spec, size, base, pooling):
    """A linear scikit-learn head (logreg, linear SVM, with the StandardScaler in front) on the backbone as one
    Keras model: the scaler folded into one Dense layer of the classifier's coefficients, then softmax
    (multinomial logistic regression), sigmoid (binary) or nothing (the SVM's decision values)."""
    import keras
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from pipeline.finetune.model import build_model

    steps = [s for _, s in est.steps] if isinstance(est, Pipeline) else [est]
    clf, front = steps[-1], steps[:-1]
    if not isinstance(clf, (LogisticRegression, LinearSVC)) or any(not isinstance(s, StandardScaler) for s in front):
        raise PipelineError(f"{rec.get('head')} head: only linear heads ({', '.join(LINEAR_HEADS)}) become a Keras "
                            "layer, and dense heads and fine-tuned models export as they are; this one can only "
                            "run with make predict")
    coef = np.asarray(clf.coef_, np.float64)  # (k, d), k = 1 for two classes
    bias = np.asarray(clf.intercept_, np.float64).reshape(-1) * np.ones(coef.shape[0])
    for s in reversed(front):  # x -> (x - mean) / scale, folded into the weights
        scale = np.asarray(s.scale_, np.float64) if s.scale_ is not None else np.ones(coef.shape[1])
        mean = np.asarray(s.mean_, np.float64) if s.mean_ is not None and s.with_mean else np.zeros(coef.shape[1])
        coef = coef / scale
        bias = bias - coef @ mean
    k, d = coef.shape
    act = ("softmax" if k > 1 else "sigmoid") if isinstance(clf, LogisticRegression) else None
    inputs = keras.Input((d,), name="features")
    dense_layer = keras.layers.Dense(k, activation=act, name="head_output")
    head = keras.Model(inputs, dense_layer(inputs), name=f"{rec.get('head')}_head")
    dense_layer.set_weights([coef.T.astype(np.float32), bias.astype(np.float32)])
    return build_model(spec, size, base, pooling, head, augment=None)


# --- exported artifacts: checked, then run by their own runtime ------------------------------------------------

@dataclass(frozen=True)
class Format:
    name: str
    ext: str  # of the file, "" for a folder
    folder: bool
    runtime: str  # module that runs it
    export_needs: tuple  # modules Model.export needs
    extra: str  # pip extra of this package, "" = always installed


FORMATS = {f.name: f for f in [
    Format("keras", ".keras", False, "keras", (), ""),
    Format("tf_saved_model", "", True, "tensorflow", (), ""),
    Format("onnx", ".onnx", False, "onnxruntime", ("tf2onnx", "onnx"), "onnx"),
    Format("litert", ".tflite", False, "ai_edge_litert", (), "litert"),
    Format("openvino", "", True, "openvino", (), "openvino"),
]}
PIP_NAMES = {"onnxruntime": "onnxruntime", "tf2onnx": "tf2onnx", "onnx": "onnx", "ai_edge_litert": "ai-edge-litert",
             "openvino": "openvino"}
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}  # OpenVINO's CPU default is bf16 where the CPU has it


def need(fmt: Format, modules) -> None:
    """A one-line error naming the pip command when a module the format needs is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pips = " ".join(PIP_NAMES.get(m, m) for m in missing)
        raise PipelineError(f"FORMAT={fmt.name} needs {', '.join(missing)}, not installed: pip install "
                            f"'pipeline[{fmt.extra}]' (in this checkout: .venv/bin/pip install -e '.[{fmt.extra}]', "
                            f"or pip install {pips})")


def tree_digest(path: str) -> tuple[str, dict]:
    """(sha256, {relative path: sha256}) of a file, or of every file under a folder (names and contents)."""
    if not os.path.isdir(path):
        return records.file_digest(path), {}
    files = {}
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, path).replace(os.sep, "/")] = records.file_digest(full)
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest(), files


def check_export(rec_path: str) -> tuple[dict, str]:
    """(record, artifact path) of an export after checking its record: format, fields, the artifact present and
    unchanged (sha256 of the file, or of every file of the folder: a changed, added or removed file is named)."""
    rec = records.read_json(rec_path)
    if not isinstance(rec, dict) or rec.get("format") != EXPORT_FORMAT:
        raise PipelineError(f"{rec_path}: not an export record of this program (format {EXPORT_FORMAT})")
    missing = [k for k in ("export_format", "file", "sha256", "classes", "input_size", "output") if k not in rec]
    if missing:
        raise PipelineError(f"{rec_path}: record lacks {', '.join(missing)}; rerun make export")
    fmt = FORMATS.get(rec["export_format"])
    if fmt is None:
        raise PipelineError(f"{rec_path}: unknown export format {rec['export_format']!r}")
    name = str(rec["file"])
    if os.path.dirname(name) or not name.endswith(fmt.ext) or name in ("", ".", ".."):
        raise PipelineError(f"{rec_path}: record names an unexpected file {name!r}")
    path = os.path.join(os.path.dirname(rec_path), name)
    if not os.path.exists(path) or os.path.isdir(path) != fmt.folder:
        raise PipelineError(f"{path}: missing (its record {rec_path} remains); rerun make export")
    sha, files = tree_digest(path)
    if sha != rec["sha256"]:
        want = rec.get("files") or {}
        changed = sorted(f for f in set(files) | set(want) if files.get(f) != want.get(f)) if fmt.folder else []
        what = f" ({', '.join(changed[:3])})" if changed else ""
        raise PipelineError(f"{path}: changed since it was exported{what} (sha256 differs from its record); "
                            "refusing to load it: rerun make export")
    if fmt.name == "keras":
        records.check_versions(rec.get("versions") or {}, rec_path)
    return rec, path


def runtime(fmt: Format, path: str, size: int, fold: bool = True):
    """``call(pixels) -> outputs`` of an exported artifact, run by its own runtime (float32 pixels in 0..255;
    uint8 batches are cast); ``fold`` applies to the .keras format only."""
    need(fmt, [fmt.runtime])
    threads = cores()
    if fmt.name == "keras":
        import keras
        import tensorflow as tf

        from pipeline.backbones import layers  # noqa: F401  registers Preprocess and InferenceMode
        from pipeline.backbones.extractor import inference

        try:
            model = keras.saving.load_model(path, safe_mode=True, compile=False)
        except Exception as e:  # keras raises ValueError, TypeError, OSError... for damaged archives
            raise PipelineError(f"{path}: cannot be loaded ({str(e).splitlines()[0][:200]}); rerun make export") \
                from None
        call = tf.function(inference(model, fold), autograph=False,
                           input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])
        return lambda x: call(np.asarray(x, np.float32)).numpy()
    if fmt.name == "tf_saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)  # kept by the closure: its functions reference its variables
        return lambda x: loaded.serve(tf.constant(np.asarray(x, np.float32))).numpy()
    if fmt.name == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.asarray(x, np.float32)})[0]
    if fmt.name == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path, num_threads=threads)
        inp, out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
        state = {"shape": None}

        def run(x):
            x = np.ascontiguousarray(x, np.float32)
            if state["shape"] != x.shape:
                interpreter.resize_tensor_input(inp, x.shape)
                interpreter.allocate_tensors()
                state["shape"] = x.shape
            interpreter.set_tensor(inp, x)
            interpreter.invoke()
            return interpreter.get_tensor(out).copy()

        return run
    if fmt.name == "openvino":
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(os.path.join(path, "model.xml"), os.path.join(path, "model.bin")),
                                      "CPU", {**OPENVINO_CONFIG, "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        output = compiled.output(0)
        return lambda x: request.infer([np.asarray(x, np.float32)])[output].copy()
    raise PipelineError(f"unknown export format {fmt.name!r}")


def open_export(rec_path: str, fold: bool = True) -> Runner:
    """The :class:`Runner` of an exported artifact, after :func:`check_export`."""
    rec, path = check_export(rec_path)
    fmt = FORMATS[rec["export_format"]]
    size = int(rec["input_size"])
    return Runner(rec_path, rec, "export", list(rec["classes"]), size,
                  (rec.get("input") or {}).get("interpolation", "bilinear"), rec["output"],
                  runtime(fmt, path, size, fold), source=rec.get("source") or {})


# --- labelling files ------------------------------------------------------------------------------------------

def image_paths(specs) -> tuple[list[str], list[tuple[str, str]], int]:
    """(files, problems, ignored) of the given files and folders: a folder gives its image files (recursively,
    links followed, hidden ones and other extensions ignored); a named file is always tried; a missing path is
    a problem. Each real file is listed once and no folder walked twice (a link loop ends there)."""
    files, problems, ignored = [], [], 0
    seen, walked = set(), set()  # real paths of files listed; (st_dev, st_ino) of folders walked
    exts = tuple("." + e for e in images.IMAGE_EXTENSIONS)

    def first(path):
        real = os.path.realpath(path)
        if real in seen:
            return False
        seen.add(real)
        return True

    def fresh(folder, top=""):
        """Mark a folder walked; False if it was, or if it holds ``top`` (a link up: a loop)."""
        try:
            st = os.stat(folder)
        except OSError:
            return True
        if (st.st_dev, st.st_ino) in walked or top.startswith(os.path.realpath(folder).rstrip(os.sep) + os.sep):
            return False
        walked.add((st.st_dev, st.st_ino))
        return True

    for spec in specs:
        if os.path.isdir(spec):
            if not fresh(spec):
                continue
            top = os.path.realpath(spec) + os.sep
            for dirpath, dirnames, filenames in os.walk(spec, followlinks=True):
                dirnames[:] = [d for d in sorted(dirnames)
                               if not images.is_hidden(d) and fresh(os.path.join(dirpath, d), top)]
                for name in sorted(filenames):
                    if images.is_hidden(name) or not name.lower().endswith(exts):
                        ignored += 1
                        continue
                    path = os.path.join(dirpath, name)
                    if first(path):
                        files.append(path)
        elif os.path.exists(spec):
            if first(spec):
                files.append(spec)
        else:
            problems.append((spec, "no such file or folder"))
    return files, problems, ignored


def split_images(text: str) -> list[str]:
    """``IMAGES``: one existing path as it is, else shell-style words (quote paths with spaces)."""
    text = text.strip()
    if not text:
        return []
    if os.path.exists(text):
        return [text]
    try:
        return shlex.split(text)
    except ValueError as e:
        raise PipelineError(f"IMAGES={text!r}: {e}") from None


def decode_batches(files, size, interpolation="bilinear", batch=32, max_pixels=images.MAX_PIXELS):
    """Yield (paths, uint8 pixels, problems) per batch of ``files``, decoded in parallel as for training (whole
    image to size x size, ``interpolation``); an unreadable file is a (path, reason) problem."""
    def decode(path):
        try:
            return images.load_resized(path, size, interpolation, max_pixels), None
        except images.BadImage as e:
            return None, str(e)

    with ThreadPoolExecutor(max_workers=min(8, 2 * cores())) as pool:
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            good, pixels, problems = [], [], []
            for path, (x, why) in zip(chunk, pool.map(decode, chunk)):
                if x is None:
                    problems.append((path, why))
                else:
                    good.append(path)
                    pixels.append(x)
            yield good, (np.stack(pixels) if pixels else None), problems


def label(runner: Runner, files, top_k=3, batch=32):
    """(results, problems): per readable file {"path", "top": [(class, score), ...]} in input order; per
    unreadable file (path, reason)."""
    classes = runner.classes
    k = max(1, min(top_k, len(classes)))
    results, problems = [], []
    for good, pixels, bad in decode_batches(files, runner.size, runner.interpolation, batch, runner.max_pixels):
        problems += bad
        if not good:
            continue
        for path, row in zip(good, runner.scores(pixels)):
            order = np.argsort(-row, kind="stable")[:k]
            results.append({"path": path, "top": [(classes[i], float(row[i])) for i in order]})
    return results, problems


def write_output(path, results, problems, output="probability") -> None:
    """``OUTPUT``: JSON when it ends in .json, else TSV (csv-quoted, so a tab, newline or quote in a path keeps
    its row), written atomically. ``output``: what the numbers are (probability, or score for decision values)."""
    if path.lower().endswith(".json"):
        records.write_json(path, {"predictions": [{"path": r["path"], "top": [{"label": c, output: p}
                                                                              for c, p in r["top"]]}
                                                  for r in results],
                                  "unreadable": [{"path": p, "reason": why} for p, why in problems]})
        return
    k = max((len(r["top"]) for r in results), default=0)
    head = ["path"] + [f"{x}_{i}" for i in range(1, k + 1) for x in ("label", output)] + ["error"]
    rows = [head]
    for r in results:
        rows.append([r["path"], *[f"{v}" for c, p in r["top"] for v in (c, f"{p:.6f}")], ""])
    for p, why in problems:
        rows.append([p] + [""] * (2 * k) + [why])
    with records.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            csv.writer(f, delimiter="\t").writerows(rows)  # \r\n rows: a \r in a path is quoted too


def describe(runner: Runner) -> str:
    if runner.kind == "export":
        return f"{runner.path} ({runner.record['export_format']} export, {runner.record.get('runtime', {}).get('name')})"
    if runner.kind in ("dense", "sklearn"):
        return f"{runner.path} ({runner.record.get('head')} head on {runner.source.get('backbone')} features)"
    return runner.path


def run(cfg: PredictConfig, extra=None, log=print, err=None) -> int:
    """The ``predict`` step: prints the top-k labels of every readable image; unreadable ones are reported
    (on stderr) and the rest still labelled. Exit status 0, or 1 when some input could not be labelled."""
    err = err or (lambda m: print(m, file=sys.stderr))
    specs = split_images(cfg.images)
    if not specs:
        raise PipelineError("no images given: make predict IMAGES='photo.jpg folder/' or "
                            "python -m pipeline predict PATH...")
    if cfg.top_k < 1 or cfg.batch < 1:
        raise PipelineError("TOP_K and BATCH must be positive")
    files, problems, ignored = image_paths(specs)
    if not files:
        for p, why in problems:
            err(f"skipped {p}: {why}")
        raise PipelineError(f"no image files in {', '.join(specs)}")
    runner = open_model(cfg.model, cfg.models_dir, log=err)
    for note in runner.notes:
        err(f"note: {note}")
    results, bad = label(runner, files, cfg.top_k, cfg.batch)
    problems += bad
    width = max(len(r["path"]) for r in results) if results else 0
    for r in results:
        log(f"{r['path']:<{width}}  " + "  ".join(f"{c} {p:.3f}" for c, p in r["top"]))
    for p, why in problems:
        err(f"skipped {p}: {why}")
    if cfg.output:
        write_output(cfg.output, results, problems, runner.output)
    note = f", {ignored} non-image file(s) ignored" if ignored else ""
    what = "" if runner.output == "probability" else " (decision values, not probabilities)"
    err(f"labelled {len(results)} image(s) with {describe(runner)}{what}{note}"
        + (f"; {len(problems)} could not be read" if problems else ""))
    return 1 if problems else 0
