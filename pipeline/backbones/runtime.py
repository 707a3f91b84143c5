"""The runtime that computes the frozen extractor's features during extraction (``RUNTIME=``).

``tensorflow`` (the default): the extractor as one compiled ``tf.function`` (:func:`extractor.compiled_call`),
BatchNorm folded unless ``FOLD_BATCHNORM=0``, in the Keras precision of ``PRECISION``.

``openvino`` (``pip install 'pipeline[openvino]'``): the same inference graph — the uint8-in tf.function of
:func:`extractor.compiled_call`, dynamic batch — converted once per run and compiled for the CPU
(``PERFORMANCE_HINT=LATENCY``) with an explicit precision hint: ``PRECISION=float32`` is OpenVINO's ``f32``,
``bfloat16`` its ``bf16``, ``float16`` its ``f16``, each only where the CPU lists the capability (OpenVINO's own
default on CPUs with AVX512-BF16 or AMX is bf16, so the hint is always set). The function is frozen into a
GraphDef that OpenVINO's C++ TensorFlow frontend reads (:func:`_read`): ``openvino.convert_model`` on the
tf.function or on the Keras model gives the same model ten times slower. OpenVINO fuses BatchNorm itself; the
folded graph is converted when BatchNorm is folded only because it is smaller (faster to convert). The Keras
model is then always built in float32: the reduced precision is OpenVINO's, not Keras'.

Either call maps uint8 ``(N, size, size, 3)`` pixels, any N, to float32 features and its result has ``.numpy()``.
ONNX Runtime was measured too (tf2onnx, CPU execution provider: 0.5-0.7x TensorFlow's folded call on the
2-core AMD EPYC this was written on), so it is not offered.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from pipeline.errors import PipelineError, choose

RUNTIMES = ("tensorflow", "openvino")
PIP = {"openvino": "openvino"}
# PRECISION -> (OpenVINO's INFERENCE_PRECISION_HINT, the CPU capability it needs in OPTIMIZATION_CAPABILITIES)
OPENVINO_PRECISIONS = {"float32": ("f32", "FP32"), "bfloat16": ("bf16", "BF16"), "float16": ("f16", "FP16")}


def check(runtime: str) -> None:
    """Fail in one line on an unknown runtime, or one whose package is not installed (nothing is imported)."""
    choose(runtime, dict.fromkeys(RUNTIMES), "runtime")
    if runtime != "tensorflow" and importlib.util.find_spec(runtime) is None:
        raise PipelineError(f"RUNTIME={runtime} needs {PIP[runtime]}, not installed: pip install "
                            f"'pipeline[{runtime}]' (in this checkout: .venv/bin/pip install -e '.[{runtime}]')")


def keras_precision(runtime: str, precision: str) -> str:
    """The precision the Keras model is built in: ``precision`` for TensorFlow; float32 for another runtime,
    which computes in ``precision`` itself."""
    return precision if runtime == "tensorflow" else "float32"


def openvino_hint(precision: str, core=None) -> str:
    """OpenVINO's CPU precision hint for ``precision``; refused in one line when the CPU lacks it."""
    hint, capability = choose(precision, OPENVINO_PRECISIONS, "precision")
    if capability != "FP32":
        if core is None:
            import openvino as ov

            core = ov.Core()
        caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        if capability not in caps:
            raise PipelineError(f"PRECISION={precision} with RUNTIME=openvino: this CPU has no {capability} "
                                f"(OpenVINO lists {', '.join(caps) or 'nothing'}); use PRECISION=float32")
    return hint


def check_precision(runtime: str, precision: str) -> None:
    """Fail in one line when ``runtime`` cannot compute in ``precision`` on this machine."""
    check(runtime)
    if runtime == "openvino":
        openvino_hint(precision)


class Features(np.ndarray):
    """A NumPy result with ``.numpy()``, as a TensorFlow tensor has: callers treat both runtimes' alike."""

    def numpy(self):
        return self.view(np.ndarray)


class OpenVINOCall:
    """The extractor compiled by OpenVINO for the CPU: ``call(x)`` on uint8 (N, size, size, 3) pixels, any N,
    returns float32 (N, dim) features (a copy: the request's own output buffer is reused by the next call).
    Not for concurrent use: one infer request, as extraction calls it from one thread."""

    def __init__(self, model, size, precision="float32", fold=False, core=None):
        import openvino as ov

        from pipeline.backbones import extractor

        self.core = core or ov.Core()
        self.hint = openvino_hint(precision, self.core)
        fn = extractor.compiled_call(model, size, fold=fold)  # uint8 in, dynamic batch: what the TF call runs
        self.folds = getattr(fn.python_function, "folds", 0)
        self.compiled = self.core.compile_model(_read(self.core, fn.get_concrete_function()), "CPU",
                                                {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.size = size

    def __call__(self, x):
        x = np.asarray(x)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"expected uint8 (N, {self.size}, {self.size}, 3) pixels, got {x.dtype} {x.shape}")
        out = self.request.infer([np.ascontiguousarray(x)], share_inputs=True, share_outputs=False)[self.output]
        return np.asarray(out, np.float32).view(Features)

    def properties(self) -> dict:
        """What the compiled model runs with (precision, hint, streams, threads)."""
        names = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS")
        out = {}
        for n in names:
            v = self.compiled.get_property(n)
            out[n] = v.to_string() if hasattr(v, "to_string") else str(getattr(v, "name", v))  # Type f32 -> "f32"
        return out


def _read(core, concrete):
    """The OpenVINO model of a TensorFlow concrete function: frozen (variables as constants) into a GraphDef
    file that OpenVINO's C++ TensorFlow frontend reads. ``openvino.convert_model`` on the function itself
    gives the same model but walks the graph through Python callbacks: 2-4 s for MobileNetV2 against 0.2-0.3 s
    here, and slower still while the decode threads hold the GIL."""
    import shutil
    import tempfile

    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    folder = tempfile.mkdtemp(prefix="pipeline-openvino-")
    try:
        graph = convert_variables_to_constants_v2(concrete).graph.as_graph_def()
        tf.io.write_graph(graph, folder, "model.pb", as_text=False)
        return core.read_model(os.path.join(folder, "model.pb"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prepare(model, size, runtime="tensorflow", precision="float32", fold=False):
    """The extractor's call for ``runtime``, ready to run (traced, or converted and compiled): uint8
    (N, size, size, 3) pixels -> float32 features with ``.numpy()``. ``model`` is built in
    :func:`keras_precision` (``fold`` folds its BatchNorm; see :mod:`pipeline.backbones.fold`)."""
    check(runtime)
    if runtime == "openvino":
        return OpenVINOCall(model, size, precision, fold=fold)
    from pipeline.backbones import extractor

    call = extractor.compiled_call(model, size, fold=fold)
    call.get_concrete_function()
    return call
