"""Cosine nearest neighbours in feature space, block by block: at most ``CELLS`` similarities at a time."""

from __future__ import annotations

import numpy as np

BLOCK = 1024  # query rows per matrix product, at most
CELLS = 1 << 25  # similarities held at once, at most (128 MiB of float32): fewer rows per block on a large base


def unit(x) -> np.ndarray:
    """Rows scaled to unit length (float32); a zero row stays zero."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest(queries, base, k=1, same=False, block=BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (N, k), indices (N, k)) of each query row's ``k`` most cosine-similar base rows, most
    similar first. ``same``: queries are the base itself and a row is not its own neighbour."""
    q, b = unit(queries), unit(base)
    k = min(k, len(b) - (1 if same else 0))
    if k <= 0 or not len(q):
        return np.zeros((len(q), max(k, 0)), np.float32), np.zeros((len(q), max(k, 0)), np.int64)
    sims, idx = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
    block = max(1, min(block, CELLS // len(b)))
    for start in range(0, len(q), block):
        s = q[start:start + block] @ b.T
        if same:
            rows = np.arange(len(s))
            s[rows, start + rows] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1, kind="stable")
        idx[start:start + len(s)] = np.take_along_axis(top, order, axis=1)
        sims[start:start + len(s)] = np.take_along_axis(s, idx[start:start + len(s)], axis=1)
    return sims, idx
