"""A cache too large for memory (``MEMORY_BUDGET=``): splits whose features are :class:`Rows`, views of the HDF5
file read a block at a time, with the API of an in-memory :class:`pipeline.cache.store.Cache`. The file is
verified chunk by chunk (bounded memory) unless it is remembered unchanged since it last passed."""

from __future__ import annotations

import re

import h5py
import numpy as np

from pipeline.cache import store
from pipeline.errors import PipelineError

BLOCK = 8192  # rows read at once by :meth:`Rows.blocks` (8,192 x 1,280 float16: 20 MiB)
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
DEFAULT_BUDGET = "2GiB"


def parse_budget(text, option="MEMORY_BUDGET") -> int:
    """Bytes of ``2GiB``, ``512M``, ``1.5g``, ``100000000`` (K, M, G, T: powers of 1,024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise PipelineError(f"{option}={text!r}: expected a size such as 2GiB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def footprint(path) -> int:
    """Bytes of a float64 copy of every row of the file (all groups): what scikit-learn heads would hold."""
    with store.open_file(path, "r") as f:
        return sum(8 * int(np.prod(f[s]["features"].shape)) for s in f if "features" in f[s])


class Rows:
    """(N, D) rows of an HDF5 dataset read only when asked: ``rows[a:b]``, ``rows[indices]``, ``rows[mask]``,
    :meth:`blocks`; ``np.asarray(rows)`` reads them all. ``index``: the dataset rows it shows, increasing."""

    ndim = 2

    def __init__(self, dataset, index):
        self.dataset, self.index = dataset, np.asarray(index, np.int64)
        self.shape = (len(self.index), int(dataset.shape[1]))
        self.dtype = dataset.dtype

    def __len__(self):
        return self.shape[0]

    def read(self, which) -> np.ndarray:
        """The rows ``which`` (a slice, indices or a boolean mask) as an array, in the order asked."""
        raw = np.atleast_1d(self.index[which])
        if not len(raw):
            return np.empty((0, self.shape[1]), self.dtype)
        lo, hi = int(raw.min()), int(raw.max()) + 1
        if hi - lo <= 2 * len(raw) + BLOCK:  # dense enough: one contiguous read, then pick
            return self.dataset[lo:hi][raw - lo]
        order = np.argsort(raw, kind="stable")
        wanted, back = np.unique(raw[order], return_inverse=True)
        out = np.empty((len(raw), self.shape[1]), self.dtype)
        out[order] = self.dataset[wanted][back]  # h5py reads increasing indices only
        return out

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.read(key[0])[(slice(None),) + key[1:]]
        if isinstance(key, (int, np.integer)):
            return self.read([key])[0]
        return self.read(key)

    def __array__(self, dtype=None, copy=None):
        out = self.read(slice(None))
        return out if dtype is None else out.astype(dtype)

    def blocks(self, size=BLOCK):
        """(start, rows[start:start + size]) over every row, in order."""
        for a in range(0, len(self), size):
            yield a, self.read(slice(a, a + size))


def blocks(X, size=BLOCK):
    """(start, rows) blocks of ``X``: :class:`Rows` read a block at a time, or an array sliced."""
    if isinstance(X, Rows):
        yield from X.blocks(size)
        return
    for a in range(0, len(X), size):
        yield a, X[a:a + size]


def is_lazy(cache) -> bool:
    return any(isinstance(sp.features, Rows) for sp in cache.splits.values())


def open_lazy(path, expect_key=None) -> store.Cache:
    """The cache at ``path`` with every group's features as :class:`Rows`, after checking its record (complete,
    no NaN/inf flagged as written) and its chunk checksums (:func:`store.verify`, skipped when
    :func:`store.verified`); the file stays open while the cache is used."""
    meta = store.check_header(path, expect_key, check_finite=True)
    before = store.state(path)
    if not store.verified(path):
        store.verify(path)
        store.remember(path, before)
    f = h5py.File(path, "r", rdcc_nbytes=store.CHUNK_CACHE_BYTES)
    splits, kept = {}, {}
    try:
        for s in f:
            g = f[s]
            keep = ~g["skipped"][()] if "skipped" in g else np.ones(g["labels"].shape[0], bool)
            kept[s] = keep
            splits[s] = store.group(g, s, Rows(g["features"], np.flatnonzero(keep)), keep)
        key, created = f.attrs["key"], f.attrs.get("created", "")
    except (OSError, KeyError, RuntimeError) as e:
        f.close()
        raise store.Damaged(path, f"corrupt or truncated cache ({str(e).splitlines()[0]})") from None
    return store.assemble(path, key, meta, created, splits, kept)
