"""The feature cache: one HDF5 file per key, written to a partial file chunk by chunk, resumable,
verified and renamed into place when complete.

Layout: root attributes ``format``, ``key``, ``config`` (JSON), ``class_names`` (JSON), ``versions``
(JSON), ``created``; one group per split with ``features`` (N, D), ``labels`` (N,), ``paths`` (N,) and
attribute ``done`` (rows written and flushed).
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
from dataclasses import dataclass

import h5py
import numpy as np

from pipeline.errors import PipelineError

FORMAT = "pipeline-features/1"
PARTIAL = ".partial"
CHUNK_CACHE_BYTES = 64 << 20


@dataclass
class Split:
    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray


@dataclass
class Cache:
    """A complete cache file, loaded into memory."""

    path: str
    key: str
    config: dict
    class_names: list
    versions: dict
    created: str
    splits: dict


def _open(path, mode):
    try:
        return h5py.File(path, mode, rdcc_nbytes=CHUNK_CACHE_BYTES)
    except OSError as e:
        raise PipelineError(f"{path}: not a readable HDF5 cache file ({str(e).splitlines()[0]}); "
                            "delete it and rerun make features") from None


class Writer:
    """Writes one cache file; resumes a partial file left by a killed run with the same key."""

    def __init__(self, path, key, attrs, layout, feature_dim, dtype="float32", chunk=256, log=print):
        """``layout``: {split: (labels, paths)} in extraction order."""
        self.path, self.partial, self.log = path, path + PARTIAL, log
        self.f = self._resume(key, layout, feature_dim, dtype) or self._create(
            key, attrs, layout, feature_dim, dtype, chunk)

    def _resume(self, key, layout, dim, dtype):
        if not os.path.exists(self.partial):
            return None
        try:
            f = h5py.File(self.partial, "r+", rdcc_nbytes=CHUNK_CACHE_BYTES)
        except OSError:
            self.log(f"{self.partial}: unreadable partial file (killed mid-write); starting over")
            os.remove(self.partial)
            return None
        ok = f.attrs.get("key") == key and all(
            s in f and f[s]["features"].shape == (len(layout[s][0]), dim)
            and f[s]["features"].dtype == np.dtype(dtype) for s in layout)
        if not ok:
            f.close()
            self.log(f"{self.partial}: partial file of another configuration; starting over")
            os.remove(self.partial)
            return None
        done = sum(int(f[s].attrs["done"]) for s in layout)
        self.log(f"resuming {os.path.basename(self.path)} at image {done} of "
                 f"{sum(len(v[0]) for v in layout.values())}")
        return f

    def _create(self, key, attrs, layout, dim, dtype, chunk):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        f = h5py.File(self.partial, "w", rdcc_nbytes=CHUNK_CACHE_BYTES)
        f.attrs["format"] = FORMAT
        f.attrs["key"] = key
        for name, value in attrs.items():
            f.attrs[name] = json.dumps(value, sort_keys=True, default=str)
        for s, (labels, paths) in layout.items():
            g = f.create_group(s)
            n = len(labels)
            g.create_dataset("features", (n, dim), dtype=dtype, chunks=(max(1, min(chunk, n)), dim))
            g.create_dataset("labels", data=np.asarray(labels, dtype=np.int32))
            g.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=h5py.string_dtype())
            g.attrs["done"] = 0
        f.flush()
        return f

    def done(self, split) -> int:
        return int(self.f[split].attrs["done"])

    def write(self, split, start, rows) -> None:
        """Store rows [start, start+len) of a split and flush: they survive a kill from here on."""
        if not np.isfinite(rows).all():
            self.f[split].attrs["nonfinite"] = True
        ds = self.f[split]["features"]
        ds[start:start + len(rows)] = rows
        self.f[split].attrs["done"] = start + len(rows)
        self.f.flush()

    def finish(self) -> str:
        """Verify the partial file's record (every row written, none NaN/inf), then rename it into place
        atomically."""
        self.f.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.f.close()
        check_header(self.partial, check_finite=True)
        os.replace(self.partial, self.path)
        return self.path

    def close(self):
        if self.f.id.valid:
            self.f.close()


def _attrs(f, path):
    if f.attrs.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a pipeline feature cache (format {f.attrs.get('format')!r})")
    try:
        return {k: json.loads(f.attrs[k]) for k in ("config", "class_names", "versions")}
    except (KeyError, ValueError):
        raise PipelineError(f"{path}: cache attributes missing or damaged; delete it and rerun make features") \
            from None


def _check_key(f, path, expect_key):
    key = f.attrs["key"]
    if expect_key is not None and key != expect_key:
        raise PipelineError(f"{path}: made for key {key[:12]}, expected {expect_key[:12]}")
    return key


def _incomplete(path, s, g):
    return PipelineError(f"{path}: split {s} has {int(g.attrs['done'])} of {g['labels'].shape[0]} rows; "
                         "the file is incomplete: rerun make features")


def _nonfinite(path, s):
    return PipelineError(f"{path}: split {s} has NaN/inf features; the backbone or weights are "
                         "broken for this input: check WEIGHTS/SIZE, delete the file and rerun")


def check_header(path, expect_key=None, check_finite=False) -> dict:
    """The record of a complete cache file (format, key, every split's rows written; with ``check_finite``
    no NaN/inf row flagged by the writer), read without its rows: any damage is a one-line error."""
    if not os.path.exists(path):
        raise PipelineError(f"{path}: no such cache file; run make features")
    with _open(path, "r") as f:
        meta = _attrs(f, path)
        _check_key(f, path, expect_key)
        try:
            for s in f:
                g = f[s]
                if int(g.attrs["done"]) != g["labels"].shape[0]:
                    raise _incomplete(path, s, g)
                if check_finite and g.attrs.get("nonfinite", False):
                    raise _nonfinite(path, s)
        except (OSError, KeyError, RuntimeError) as e:
            raise PipelineError(f"{path}: corrupt or truncated cache ({str(e).splitlines()[0]}); "
                                "delete it and rerun make features") from None
    return meta


def load(path, expect_key=None, check_complete=True, check_finite=True) -> Cache:
    """Load a complete cache into memory after checking its record; any damage is a one-line error."""
    if not os.path.exists(path):
        raise PipelineError(f"{path}: no such cache file; run make features")
    with _open(path, "r") as f:
        meta = _attrs(f, path)
        key, created = _check_key(f, path, expect_key), f.attrs.get("created", "")
        splits = {}
        try:
            for s in f:
                g = f[s]
                n = g["labels"].shape[0]
                if check_complete and int(g.attrs["done"]) != n:
                    raise _incomplete(path, s, g)
                feats = np.empty(g["features"].shape, g["features"].dtype)
                if n:
                    g["features"].read_direct(feats)
                splits[s] = Split(feats, g["labels"][()], g["paths"].asstr()[()])
        except (OSError, KeyError, RuntimeError) as e:
            raise PipelineError(f"{path}: corrupt or truncated cache ({str(e).splitlines()[0]}); "
                                "delete it and rerun make features") from None
    if check_finite:
        for s, sp in splits.items():
            if not np.isfinite(sp.features).all():
                raise _nonfinite(path, s)
    return Cache(path, key, meta["config"], meta["class_names"], meta["versions"], created, splits)


def listing(cache_dir) -> list[dict]:
    """One row per cache file (complete or partial): key, source, backbone, size, counts, date."""
    rows = []
    for path in sorted(glob.glob(os.path.join(cache_dir, "*.h5")) + glob.glob(os.path.join(cache_dir, "*.h5" + PARTIAL))):
        row = {"file": os.path.basename(path), "status": "partial" if path.endswith(PARTIAL) else "complete"}
        try:
            with h5py.File(path, "r") as f:
                meta = _attrs(f, path)
                cfg = meta["config"]
                row.update(key=f.attrs["key"][:12], source=cfg.get("data"), backbone=cfg.get("backbone"),
                           weights=cfg.get("weights"), size=cfg.get("size"), pooling=cfg.get("pooling"),
                           counts={s: f"{int(f[s].attrs['done'])}/{f[s]['labels'].shape[0]}" for s in f},
                           date=f.attrs.get("created", ""))
        except (OSError, PipelineError, KeyError) as e:
            row["status"] = f"unreadable: {str(e).splitlines()[0][:60]}"
        rows.append(row)
    return rows
