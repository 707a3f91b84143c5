"""Incremental extraction: an earlier cache of the same backbone configuration lends its rows.

A cache made for another manifest but the same identity otherwise (backbone, weights digest, size, alpha,
interpolation, preprocessing, pooling, dtype, precision, folding, extract version, runtime), the same BATCH
and the same TensorFlow, Keras and NumPy versions holds, in each group's ``content_sha256`` column, the
content hash of every row's image. Its rows are lent by :meth:`pipeline.cache.groups.Group.key`: a clean
row by its image's content hash; a view row by (content hash, view j), and only by a cache of the same
augmentation options and SEED (view j of an image depends on exactly these); a TTA row by (content hash,
``tta``), only by a cache of the same TTA. The engine (:mod:`pipeline.cache.engine`) copies the rows lent
and computes the others; the new cache is complete, keyed by its own manifest, and equal to a from-scratch
one (bit for bit where a row's place in its batch keeps its bytes, else to float rounding)."""

from __future__ import annotations

import glob
import hashlib
import json
import os

import h5py
import numpy as np

from pipeline.cache import groups, store
from pipeline.cache.groups import HASHES
from pipeline.errors import PipelineError

BLOCK_ROWS = 4096  # rows read at a time when a lender's checksums are verified


def _same_backbone(identity) -> str:
    """What makes a row of an image: the identity without the manifest, views and TTA (which add rows of
    their own, lent only as :func:`_accepts` says), the weights by their digest only."""
    ident = {k: v for k, v in identity.items() if k not in ("manifest", "views", "tta")}
    ident["weights"] = {"sha256": (identity.get("weights") or {}).get("sha256")}
    return json.dumps(ident, sort_keys=True)


def _augmentation(identity):
    """The views' augmentation options and SEED of ``identity`` (without the count), or None."""
    views = dict(identity.get("views") or {})
    views.pop("count", None)
    return views or None


def _accepts(lender_identity, identity) -> tuple:
    """The kinds of rows a cache of ``lender_identity`` lends to a plan of ``identity`` (the same backbone):
    clean rows always, view rows with the same augmentation, TTA rows with the same TTA."""
    kinds = [groups.CLEAN]
    if _augmentation(identity) is not None and _augmentation(lender_identity) == _augmentation(identity):
        kinds.append(groups.VIEW)
    if identity.get("tta") is not None and lender_identity.get("tta") == identity.get("tta"):
        kinds.append(groups.TTA)
    return tuple(kinds)


def _computing_versions(versions) -> str:
    return json.dumps({k: v for k, v in (versions or {}).items() if k not in ("h5py",)}, sort_keys=True)


class Lender:
    """A complete, verified cache file whose rows are copied: ``rows`` maps lend key -> (group, row) of every
    row of ``kinds`` it holds whose image decoded."""

    def __init__(self, path, rows, kinds=(groups.CLEAN,)):
        self.path, self.rows, self.kinds = path, rows, tuple(kinds)
        self.f = None

    def take(self, keys) -> np.ndarray:
        """The rows of these lend keys, in order."""
        if self.f is None:
            self.f = h5py.File(self.path, "r", rdcc_nbytes=store.CHUNK_CACHE_BYTES)
        where = [self.rows[k] for k in keys]
        out = None
        for s in dict.fromkeys(w[0] for w in where):
            pos = [j for j, w in enumerate(where) if w[0] == s]
            idx = np.asarray([where[j][1] for j in pos])
            lo, hi = int(idx.min()), int(idx.max()) + 1
            feats = self.f[s]["features"]
            if hi - lo <= 4 * len(idx):  # nearly contiguous: one slice
                block = feats[lo:hi][idx - lo]
            else:
                uniq = np.unique(idx)
                block = feats[uniq.tolist()][np.searchsorted(uniq, idx)]
            if out is None:
                out = np.empty((len(where), block.shape[1]), block.dtype)
            out[pos] = block
        return out

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def _rows(f, kinds) -> dict:
    """{lend key: (group, row)} of the rows of open cache file ``f`` of ``kinds`` whose image decoded."""
    rows = {}
    for name in f:
        kind = groups.kind_of(name)
        if kind not in kinds or HASHES not in f[name]:
            continue
        shas, skipped = f[name][HASHES][()], f[name]["skipped"][()]
        view = f[name]["view"][()] if kind == groups.VIEW else None
        for r in np.flatnonzero(~skipped):
            key = groups.lend_key(kind, shas[r].decode(), None if view is None else view[r])
            rows.setdefault(key, (name, int(r)))
    return rows


def lender_rows(path, kinds) -> dict:
    """:func:`_rows` of cache file ``path``."""
    with h5py.File(path, "r") as f:
        return _rows(f, kinds)


def _candidate(path, identity, versions, batch, needed):
    """(rows lent, created, {key: (group, row)}, kinds) of cache file ``path`` when it can lend rows to a plan
    of ``identity``, else None."""
    try:
        store.check_header(path, check_finite=True)
        with h5py.File(path, "r") as f:
            config = json.loads(f.attrs["config"])
            theirs = config.get("identity") or {}
            if _same_backbone(theirs) != _same_backbone(identity) or config.get("batch") != batch:
                return None
            if _computing_versions(json.loads(f.attrs["versions"])) != versions:
                return None
            if any(HASHES not in f[s] for s in f if groups.kind_of(s)):
                return None  # made before caches recorded their content hashes
            kinds = _accepts(theirs, identity)
            rows, created = _rows(f, kinds), str(f.attrs.get("created", ""))
    except (OSError, KeyError, ValueError, PipelineError):
        return None
    hits = sum(1 for k in needed if k in rows)
    return (hits, created, rows, kinds) if hits else None


def _verified(path) -> bool:
    """Every split's features match the checksum recorded when the file was finished."""
    try:
        with h5py.File(path, "r", rdcc_nbytes=store.CHUNK_CACHE_BYTES) as f:
            for s in f:
                g = f[s]
                sha, h = g.attrs.get("sha256"), hashlib.sha256()
                for k in range(0, g["features"].shape[0], BLOCK_ROWS):
                    h.update(np.ascontiguousarray(g["features"][k:k + BLOCK_ROWS]).tobytes())
                if sha is None or h.hexdigest() != sha:
                    return False
    except (OSError, KeyError, RuntimeError):
        return False
    return True


def find(plan) -> Lender | None:
    """The cache in CACHE_DIR that lends the most rows to ``plan`` (same backbone configuration and BATCH,
    another manifest), verified; None when none holds any of its rows. ``Lender.kinds``: the kinds of rows it
    lends (:func:`_accepts`)."""
    versions = _computing_versions(plan.record()["versions"])
    needed = {g.key(plan.ds, r) for g in groups.of(plan).values() for r in range(len(g.items))}
    found = []
    for path in sorted(glob.glob(os.path.join(plan.cfg.cache_dir, "*.h5"))):
        if os.path.abspath(path) == os.path.abspath(plan.path):
            continue
        c = _candidate(path, plan.identity, versions, plan.cfg.batch, needed)
        if c is not None:
            found.append((c[0], c[1], path, c[2], c[3]))
    for hits, _, path, rows, kinds in sorted(found, key=lambda c: (c[0], c[1]), reverse=True):
        if _verified(path):
            return Lender(path, rows, kinds)
        plan.log(f"warning: {path} has changed since it was written (checksum mismatch): its rows are not reused")
    return None
