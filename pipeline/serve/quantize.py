"""``QUANTIZE``: float16, dynamic-range and int8 artifacts, written by each format's own tools: the TFLite
converter (LiteRT), onnxruntime's quantisation (ONNX; float16 through onnxconverter-common), OpenVINO's compressed
weights (float16) and NNCF (int8). Quantised artifacts are judged on the whole test split
(:mod:`pipeline.serve.judge`), not held to the float agreement check.

TensorFlow, onnx, onnxruntime, OpenVINO and NNCF are imported lazily, by the mode that needs them (optional
extras)."""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np

from pipeline.errors import PipelineError

MODES = ("none", "float16", "dynamic", "int8", "int8_io")
CALIBRATED = ("int8", "int8_io")  # the modes calibrated on representative images
POSSIBLE = {"keras": ("none",), "tf_saved_model": ("none",), "litert": MODES,
            "onnx": ("none", "float16", "dynamic", "int8"), "openvino": ("none", "float16", "int8")}
NEEDS = {("onnx", "float16"): ("onnxconverter_common", "onnxconverter-common"), ("openvino", "int8"): ("nncf", "nncf")}
HOW = {("litert", "float16"): "TFLite converter, float16 weights",
       ("litert", "dynamic"): "TFLite converter, dynamic range (int8 weights, float activations)",
       ("litert", "int8"): "TFLite converter, full integer (int8 weights and activations; float32 input and output)",
       ("litert", "int8_io"): ("TFLite converter, full integer with int8 input and output (pixels and probabilities "
                               "carry the tensors' scale and zero point), for integer-only runtimes"),
       ("onnx", "float16"): "onnxconverter-common float16 (float32 input and output kept)",
       ("onnx", "dynamic"): "onnxruntime quantize_dynamic, int8 weights (QInt8), activations quantised at run time",
       ("onnx", "int8"): ("onnxruntime quantize_static, QDQ, uint8 activations and int8 weights per channel (U8S8), "
                         "MinMax calibration"),
       ("openvino", "float16"): "OpenVINO save_model(compress_to_fp16=True): float16 weights, float32 compute",
       ("openvino", "int8"): "NNCF post-training quantisation (nncf.quantize), int8, full bias correction"}


def check(fmt: str, mode: str) -> None:
    """A one-line error for a mode the format cannot have (listing those it can) or whose package is missing."""
    if mode not in MODES:
        raise PipelineError(f"QUANTIZE={mode}: one of {', '.join(MODES)}")
    if mode not in POSSIBLE[fmt]:
        pairs = "; ".join(f"FORMAT={f}: {', '.join(m)}" for f, m in POSSIBLE.items())
        raise PipelineError(f"QUANTIZE={mode} is not possible with FORMAT={fmt}; possible: {pairs}")
    module, pip = NEEDS.get((fmt, mode), (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise PipelineError(f"FORMAT={fmt} QUANTIZE={mode} needs {pip}, not installed: pip install {pip}")


def write(model, fmt, mode: str, target: str, size: int, write_float, representative) -> None:
    """``model`` as a ``mode`` artifact of ``fmt`` at ``target``; ``write_float(model, fmt, path, size)`` writes the
    float one, ``representative()`` gives the uint8 calibration images (int8)."""
    work = target + ".float"
    if fmt.name == "litert":
        _litert(model, mode, target, size, work, representative)
    elif fmt.name == "onnx":
        write_float(model, fmt, work + ".onnx", size)
        _onnx(mode, work + ".onnx", target, representative)
    elif fmt.name == "openvino":
        write_float(model, fmt, work, size)
        _openvino(mode, work, target, representative)
    else:
        raise PipelineError(f"FORMAT={fmt.name}: no quantisation")
    for left in (work, work + ".onnx", work + ".onnx.pre.onnx"):
        if os.path.isdir(left):
            shutil.rmtree(left)
        elif os.path.exists(left):
            os.remove(left)


def _batches(representative):
    for image in representative():
        yield image[None].astype(np.float32)


def _litert(model, mode, target, size, work, representative):
    import tensorflow as tf

    signature = [tf.TensorSpec((None, size, size, 3), tf.float32, name="pixels")]
    model.export(work, format="tf_saved_model", verbose=False, input_signature=signature)
    converter = tf.lite.TFLiteConverter.from_saved_model(work)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode in CALIBRATED:
        converter.representative_dataset = lambda: ([b] for b in _batches(representative))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if mode == "int8_io":
            converter.inference_input_type = converter.inference_output_type = tf.int8
    with open(target, "wb") as f:
        f.write(converter.convert())


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over the representative images, one at a time."""

    def __init__(self, name, representative):
        self.name, self.it = name, _batches(representative)

    def get_next(self):
        batch = next(self.it, None)
        return None if batch is None else {self.name: batch}


def _onnx(mode, src, target, representative):
    import onnx
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode == "float16":
        from onnxconverter_common import float16

        onnx.save(float16.convert_float_to_float16(onnx.load(src), keep_io_types=True), target)
    elif mode == "dynamic":
        q.quantize_dynamic(src, target, weight_type=q.QuantType.QInt8)
    else:
        name = onnx.load(src).graph.input[0].name
        pre = src + ".pre.onnx"  # shape inference and graph optimisation, as onnxruntime recommends
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        q.quantize_static(pre, target, _Reader(name, representative), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)


def _openvino(mode, src, target, representative):
    import openvino as ov

    model = ov.Core().read_model(os.path.join(src, "model.xml"))
    os.mkdir(target)
    if mode == "float16":
        ov.save_model(model, os.path.join(target, "model.xml"), compress_to_fp16=True)
        return
    import nncf

    data = list(_batches(representative))  # every image; full bias correction: measured in docs/export.md
    quantized = nncf.quantize(model, nncf.Dataset(data), subset_size=len(data), fast_bias_correction=False)
    ov.save_model(quantized, os.path.join(target, "model.xml"), compress_to_fp16=False)
