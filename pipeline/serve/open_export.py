"""Exported artifacts (``make export``) as runners: their record and files checked, then run by their own
runtime.

Each runtime (Keras/TensorFlow, onnxruntime, ai-edge-litert, OpenVINO) is imported lazily, by the format that
needs it: they are optional extras, and predict imports this module for every model, TensorFlow-free ones too."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from pipeline import quiet, records
from pipeline.artifacts import tree_digest
from pipeline.data.loading import cores
from pipeline.errors import PipelineError
from pipeline.serve.runner import EXPORT_FORMAT, Runner

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
    if fmt.runtime in ("keras", "tensorflow"):
        quiet.tensorflow()
    if fmt.name == "keras":
        return _keras(path, size, fold)
    if fmt.name == "tf_saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)  # kept by the closure: its functions reference its variables
        return lambda x: loaded.serve(tf.constant(np.asarray(x, np.float32))).numpy()
    if fmt.name == "onnx":
        return _onnx(path)
    if fmt.name == "litert":
        return _litert(path)
    if fmt.name == "openvino":
        return _openvino(path)
    raise PipelineError(f"unknown export format {fmt.name!r}")


def _keras(path, size, fold):
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


def _onnx(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cores()
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.asarray(x, np.float32)})[0]


def _litert(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=cores())
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    state = {"shape": None}

    def run(x):
        x = _quantized(np.asarray(x, np.float32), inp)
        if state["shape"] != x.shape:
            interpreter.resize_tensor_input(inp["index"], x.shape)
            interpreter.allocate_tensors()
            state["shape"] = x.shape
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        if out["dtype"] == np.float32:
            return y.copy()
        scale, zero = out["quantization"]
        return (y.astype(np.float32) - zero) * scale

    return run


def _quantized(x, detail):
    """``x`` as the input tensor takes it: float32 as is, an integer tensor by its scale and zero point."""
    if detail["dtype"] == np.float32:
        return np.ascontiguousarray(x)
    scale, zero = detail["quantization"]
    bounds = np.iinfo(detail["dtype"])
    return np.clip(np.rint(x / scale + zero), bounds.min, bounds.max).astype(detail["dtype"])


def _openvino(path):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(os.path.join(path, "model.xml"), os.path.join(path, "model.bin")),
                                  "CPU", {**OPENVINO_CONFIG, "INFERENCE_NUM_THREADS": cores()})
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return lambda x: request.infer([np.asarray(x, np.float32)])[output].copy()


def open_export(rec_path: str, fold: bool = True) -> Runner:
    """The :class:`Runner` of an exported artifact, after :func:`check_export`."""
    rec, path = check_export(rec_path)
    fmt = FORMATS[rec["export_format"]]
    size = int(rec["input_size"])
    return Runner(rec_path, rec, "export", list(rec["classes"]), size,
                  (rec.get("input") or {}).get("interpolation", "bilinear"), rec["output"],
                  runtime(fmt, path, size, fold), source=rec.get("source") or {})
