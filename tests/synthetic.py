"""Synthetic feature caches written with ``pipeline.cache.writer.Writer``: Gaussian blobs, fast to fit."""

import numpy as np

from pipeline import records
from pipeline.cache.writer import Writer


def write_arrays(path, class_names, splits, tag="synthetic"):
    """A complete cache file at ``path`` from {split: (features (N, D), labels (N,))}. Returns the path."""
    layout = {s: (y, [f"{class_names[c]}/{s}_{i:04d}.jpg" for i, c in enumerate(y)]) for s, (X, y) in splits.items()}
    dim = next(iter(splits.values()))[0].shape[1]
    key = records.digest({"tag": tag, "rows": {s: records.digest(X.tolist()) for s, (X, _) in splits.items()},
                          "classes": list(class_names)})
    attrs = {"config": {"synthetic": tag}, "class_names": list(class_names), "versions": records.versions()}
    w = Writer(str(path), key, attrs, layout, dim, log=lambda m: None)
    for s, (X, _) in splits.items():
        w.write(s, 0, np.asarray(X, np.float32))
    w.finish()
    return str(path)


def blobs(class_names=("cat", "dog", "fox"), counts=None, dim=16, sep=3.0, seed=0):
    """{split: (X, y)}: one Gaussian blob per class; ``counts`` = {split: rows per class (int or list)}."""
    counts = counts or {"train": 30, "val": 10, "test": 10}
    rng = np.random.default_rng(seed)
    means = rng.normal(0, sep, (len(class_names), dim))
    out = {}
    for s, n in counts.items():
        per = [n] * len(class_names) if np.isscalar(n) else list(n)
        y = np.repeat(np.arange(len(class_names)), per).astype(np.int32)
        out[s] = ((means[y] + rng.normal(0, 1.0, (len(y), dim))).astype(np.float32), y)
    return out


def xor(n=40, dim=6, seed=0):
    """Two classes, each two blobs at opposite corners (XOR): no linear head separates them."""
    rng = np.random.default_rng(seed)
    out = {}
    for s, m in (("train", n), ("val", n // 2), ("test", n // 2)):
        corner = rng.integers(0, 2, (2 * m, 2))
        y = (corner[:, 0] ^ corner[:, 1]).astype(np.int32)
        X = rng.normal(0, 0.3, (2 * m, dim))
        X[:, :2] += corner * 4 - 2
        out[s] = (X.astype(np.float32), y)
    return out


def write_cache(path, class_names=("cat", "dog", "fox"), counts=None, dim=16, sep=3.0, seed=0):
    """A blobs cache at ``path``."""
    return write_arrays(path, class_names, blobs(class_names, counts, dim, sep, seed), tag=f"blobs{seed}")
