"""Duplicates and leaks: exact duplicates by content hash (the cache's per-row ``content_sha256``) within and
across splits, and val/test images that nearly duplicate a train image in feature space. "Nearly" is relative
to the data: closer (cosine distance) to a train image than ``fraction`` x the ``quantile`` of the train
images' own nearest-train-neighbour distances, so that a dataset of similar images does not flag itself."""

from __future__ import annotations

import hashlib
import os

import h5py
import numpy as np

from pipeline.cache import reuse
from pipeline.reports.audit import Skipped, knn

SPLITS = ("train", "val", "test")


def stored_hashes(cache) -> dict | None:
    """{split: content sha256 of every row} as the cache file stores them (rows that did not decode left out,
    as :func:`pipeline.cache.store.load` does); None when the file has no such column."""
    if getattr(cache, "hashes", None) is not None:  # an ensemble's joined cache (pipeline.cache.ensemble)
        return cache.hashes
    out = {}
    with h5py.File(cache.path, "r") as f:
        for s in cache.splits:
            if s not in f or reuse.HASHES not in f[s]:
                return None
            g = f[s]
            keep = ~g["skipped"][()] if "skipped" in g else np.ones(g["labels"].shape[0], bool)
            out[s] = g[reuse.HASHES][()][keep].astype(str)
    return out


def file_hashes(cache) -> dict:
    """{split: sha256 of every row's image file} read from the source folder; Skipped when it is gone."""
    root = cache.config.get("source_root")
    if not root:
        raise Skipped("the cache has no content hashes and no source folder (an in-memory dataset): remake it "
                      "with make features to check exact duplicates")
    out = {}
    for s, sp in cache.splits.items():
        try:
            out[s] = np.asarray([hashlib.sha256(open(os.path.join(root, p), "rb").read()).hexdigest()
                                 for p in sp.paths])
        except OSError as e:
            raise Skipped(f"cannot read {e.filename} to hash it; remake the cache with make features") from None
    return out


def exact(hashes: dict, paths: dict) -> list[dict]:
    """Groups of rows with identical content: {"sha256", "splits" (sorted), "paths", "across" (several
    splits)}, across-split groups first, then the largest."""
    groups = {}
    for s in SPLITS:
        for h, p in zip(hashes.get(s, ()), paths.get(s, ())):
            groups.setdefault(h, []).append((s, str(p)))
    out = [{"sha256": h, "splits": sorted({s for s, _ in m}, key=SPLITS.index), "paths": [p for _, p in m]}
           for h, m in groups.items() if len(m) > 1]
    for g in out:
        g["across"] = len(g["splits"]) > 1
    return sorted(out, key=lambda g: (not g["across"], -len(g["paths"]), g["paths"][0]))


def threshold(train_features, quantile=0.01, fraction=0.5) -> dict:
    """The near-duplicate cosine distance: ``fraction`` x the ``quantile`` of each train image's distance to
    its nearest other train image (exact duplicates, at distance ~0, left out of the quantile)."""
    if len(train_features) < 2:
        raise Skipped("the train split has fewer than two images: no scale to measure closeness against")
    sims, _ = knn.nearest(train_features, train_features, 1, same=True)
    d = 1 - sims[:, 0].astype(np.float64)
    d = d[d > 1e-6] if (d > 1e-6).any() else d
    base = float(np.quantile(d, quantile))
    return {"distance": fraction * base, "base": base, "quantile": quantile, "fraction": fraction,
            "median": float(np.median(d))}


def near(train, others: dict, distance: float) -> list[dict]:
    """Rows of ``others`` ({split: Split}) within cosine ``distance`` of a train row, the closest first:
    split, path, train_path, distance."""
    out = []
    for name, sp in others.items():
        if not len(sp.labels):
            continue
        sims, idx = knn.nearest(sp.features, train.features, 1)
        d = 1 - sims[:, 0].astype(np.float64)
        out += [{"split": name, "path": str(sp.paths[i]), "train_path": str(train.paths[idx[i, 0]]),
                 "distance": max(float(d[i]), 0.0)} for i in np.flatnonzero(d <= distance)]
    return sorted(out, key=lambda r: r["distance"])
