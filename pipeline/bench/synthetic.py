"""Synthetic feature caches of any size, written through :class:`pipeline.cache.writer.Writer` (the real format,
a real key), a chunk at a time so that a million rows never stand in memory at once. The classes are Gaussian
blobs around means in a low-dimensional subspace, so a linear head's accuracy means something (and is below
1 when ``noise`` makes the blobs overlap)."""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline import records
from pipeline.cache.groups import HASHES
from pipeline.cache.writer import Writer

SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}


def layout(n: int, classes: int, seed: int, hashes: bool = False) -> dict:
    """{split: (labels, paths[, {content_sha256}])}: ``n`` rows shared 70/15/15, labels drawn uniformly over
    ``classes``; ``hashes``: each row's content hash column, as real caches have (the hash of its path: no two
    rows alike)."""
    rng = np.random.default_rng(seed)
    out, start = {}, 0
    for s, share in SPLITS.items():
        m = n - start if s == "test" else int(round(n * share))
        y = rng.integers(0, classes, m).astype(np.int32)
        paths = [f"class{c}/{s}_{start + i:07d}.jpg" for i, c in enumerate(y)]
        out[s] = (y, paths) + (({HASHES: np.asarray([hashlib.sha256(p.encode()).hexdigest() for p in paths],
                                                     dtype="S64")},) if hashes else ())
        start += m
    return out


def means(classes: int, dim: int, seed: int, rank: int = 16, sep: float = 0.5) -> np.ndarray:
    """(classes, dim) class means spanning a ``rank``-dimensional subspace, about ``5.7 sep`` apart (the noise's
    standard deviation is 1)."""
    rng = np.random.default_rng(seed + 1)
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].T  # (rank, dim), orthonormal rows
    return (rng.normal(0, sep, (classes, rank)) @ basis).astype(np.float32)


def write_cache(path, n: int, dim: int = 1280, classes: int = 10, dtype: str = "float16", seed: int = 0,
                noise: float = 1.0, chunk: int = 1024, hashes: bool = False) -> str:
    """A complete cache file of ``n`` rows x ``dim`` at ``path`` (features = class mean + Gaussian noise, stored
    as ``dtype``; ``hashes``: with the per-row content hash column); its key names every parameter. Returns
    the path."""
    params = {"synthetic": "blobs", "n": n, "dim": dim, "classes": classes, "dtype": dtype, "seed": seed,
              "noise": noise, "chunk": chunk, "hashes": hashes}
    lay = layout(n, classes, seed, hashes)
    attrs = {"config": params, "class_names": [f"class{c}" for c in range(classes)],
             "versions": records.versions()}
    w = Writer(str(path), records.digest(params), attrs, lay, dim, dtype=dtype, chunk=chunk, log=lambda m: None)
    try:
        mu, rng = means(classes, dim, seed), np.random.default_rng(seed + 2)
        for s, (y, *_) in lay.items():
            for a in range(0, len(y), chunk):
                part = y[a:a + chunk]
                rows = mu[part] + rng.standard_normal((len(part), dim), dtype=np.float32) * noise
                w.write(s, a, rows)
        return w.finish()
    finally:
        w.close()
