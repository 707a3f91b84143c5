"""The runtime that computes the frozen extractor's features during extraction (``RUNTIME=``).

``tensorflow`` (the default): the extractor as one compiled ``tf.function`` (:func:`extractor.compiled_call`),
BatchNorm folded unless ``FOLD_BATCHNORM=0``, in the Keras precision of ``PRECISION``.

``openvino`` (``pip install 'pipeline[openvino]'``): the same inference graph — the uint8-in tf.function of
:func:`extractor.compiled_call`, preprocessing inside, dynamic batch — converted (:func:`convert`), stored in
the cache folder for the next runs (:mod:`pipeline.backbones.openvino_store`) and compiled for the CPU
(``PERFORMANCE_HINT=LATENCY``, :class:`OpenVINOCall`) with an explicit precision hint: ``PRECISION=float32`` is
OpenVINO's ``f32``, ``bfloat16`` its ``bf16``, ``float16`` its ``f16``, each only where the CPU lists the
capability (OpenVINO's own default on CPUs with AVX512-BF16 or AMX is bf16, so the hint is always set). The
function is frozen into a GraphDef that OpenVINO's C++ TensorFlow frontend reads (:func:`_read`):
``openvino.convert_model`` on the tf.function or on the Keras model gives the same model ten times slower.
OpenVINO fuses BatchNorm itself; the folded graph is converted when BatchNorm is folded only because it is
smaller (faster to convert). The Keras model is then always built in float32: the reduced precision is
OpenVINO's, not Keras'. A stored model is compiled without TensorFlow.

Either call maps uint8 ``(N, size, size, 3)`` pixels, any N, to float32 features and its result has ``.numpy()``.
ONNX Runtime was measured too (tf2onnx, CPU execution provider: 0.5-0.7x TensorFlow's folded call on the
2-core AMD EPYC this was written on), so it is not offered.

OpenVINO (an optional extra) and TensorFlow (the Keras extractor, :mod:`.extractor`) are imported lazily, by
the functions that need them: a stored OpenVINO model is read and run without TensorFlow.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import numpy as np

from pipeline import keras_internals
from pipeline.backbones import openvino_store
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
        core = core or openvino_core()
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


_CORE = None


def openvino_core():
    """The process' one ``openvino.Core`` (made on first use)."""
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


class OpenVINOCall:
    """An ``openvino.Model`` of the extractor compiled for the CPU in ``precision``: ``call(x)`` on uint8
    (N, size, size, 3) pixels, any N, returns float32 (N, dim) features (a copy: the request's own output buffer
    is reused by the next call). Not for concurrent use: one infer request, as extraction calls it from one
    thread."""

    def __init__(self, ov_model, size, precision="float32", core=None):
        self.core = core or openvino_core()
        self.hint = openvino_hint(precision, self.core)
        self.compiled = self.core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": self.hint,
                                                                  "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.size = size
        self.dim = int(self.output.get_partial_shape()[-1].get_length())

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


def convert(model, size, fold=False, core=None):
    """The ``openvino.Model`` of Keras extractor ``model``: its uint8-in inference call (what the TensorFlow
    runtime runs; ``fold``: BatchNorm folded), frozen and read by OpenVINO's TensorFlow frontend."""
    from pipeline.backbones import extractor

    fn = extractor.compiled_call(model, size, fold=fold)  # uint8 in, dynamic batch: what the TF call runs
    return _read(core or openvino_core(), fn.get_concrete_function())


def stored_call(cache_dir, identity, size, precision, build, log=print):
    """The :class:`OpenVINOCall` of the extractor of a cache ``identity`` (:class:`pipeline.cache.plan.Plan`): its
    OpenVINO model stored in ``cache_dir`` when it checks out (nothing built, TensorFlow not imported), else
    ``build()`` (the Keras extractor, in float32) converted and stored."""
    core = openvino_core()
    fold = bool(identity.get("fold_batchnorm"))
    model = openvino_store.get(cache_dir, openvino_store.made_from(identity),
                               lambda: convert(build(), size, fold, core), core, log)
    return OpenVINOCall(model, size, precision, core)


def _read(core, concrete):
    """The OpenVINO model of a TensorFlow concrete function: frozen (variables as constants) into a GraphDef
    file that OpenVINO's C++ TensorFlow frontend reads. ``openvino.convert_model`` on the function itself
    gives the same model but walks the graph through Python callbacks: 2-4 s for MobileNetV2 against 0.2-0.3 s
    here, and slower still while the decode threads hold the GIL."""
    import tensorflow as tf

    folder = tempfile.mkdtemp(prefix="pipeline-openvino-")
    try:
        graph = keras_internals.frozen_graph_def(concrete)
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
        return OpenVINOCall(convert(model, size, fold), size, precision)
    from pipeline.backbones import extractor

    call = extractor.compiled_call(model, size, fold=fold)
    call.get_concrete_function()
    return call
