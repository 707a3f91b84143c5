"""The feature cache: one HDF5 file per key, written to a partial file chunk by chunk, resumable,
verified and renamed into place when complete.

Layout: root attributes ``format``, ``key``, ``config`` (JSON), ``class_names`` (JSON), ``versions``
(JSON), ``created``, ``chunk``; one group per split with ``features`` (N, D), ``labels`` (N,), ``paths``
(N,), ``chunks`` ("stop:sha256" of every write, at index start // chunk), attribute ``done`` (rows written
and flushed: recorded only after the rows are on disk) and, once complete, ``sha256`` of all its feature
bytes (checked on every load). A resumed partial file is re-verified chunk by chunk before it is trusted.
Writers of one file hold an exclusive lock on ``<file>.lock`` (:func:`locked`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import h5py
import numpy as np

from pipeline.errors import PipelineError

FORMAT = "pipeline-features/1"
PARTIAL = ".partial"
CHUNK_CACHE_BYTES = 64 << 20
LOCK = ".lock"
SPACE_MARGIN = 1 << 20  # free bytes kept beyond the rows: HDF5's own metadata must never meet a full disk


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
    """Writes one cache file; resumes a partial file left by a killed run with the same key, after checking
    every chunk it holds against its recorded checksum (rows that fail are extracted again)."""

    def __init__(self, path, key, attrs, layout, feature_dim, dtype="float32", chunk=256, log=print):
        """``layout``: {split: (labels, paths)} in extraction order."""
        self.path, self.partial, self.log = path, path + PARTIAL, log
        self.layout, self.dim, self.dtype = layout, feature_dim, np.dtype(dtype)
        self.hashes, self.next = {}, {}
        if not os.path.exists(self.partial):
            self._check_space(self._left_bytes())  # checked before the file exists: HDF5 never meets a full disk
        try:
            self.f = self._resume(key, layout, feature_dim, dtype) or self._create(
                key, attrs, layout, feature_dim, dtype, chunk)
        except OSError as e:
            raise self._error(e) from None
        self.chunk = int(self.f.attrs["chunk"])
        self._check_space(self._left_bytes())

    def _left_bytes(self) -> int:
        left = sum(len(labels) - self.next.get(s, 0) for s, (labels, _) in self.layout.items())
        return left * self.dim * self.dtype.itemsize

    def _check_space(self, need: int) -> None:
        """A one-line error, before anything is written, when the folder lacks room for ``need`` more bytes."""
        folder = os.path.dirname(os.path.abspath(self.partial))
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return
        if free < need + SPACE_MARGIN:
            raise self._no_space(need + SPACE_MARGIN - free)

    def _resume(self, key, layout, dim, dtype):
        if not os.path.exists(self.partial):
            return None
        try:
            f = h5py.File(self.partial, "r+", rdcc_nbytes=CHUNK_CACHE_BYTES)
        except OSError:
            self.log(f"{self.partial}: unreadable partial file (killed mid-write); starting over")
            os.remove(self.partial)
            return None
        ok = f.attrs.get("key") == key and "chunk" in f.attrs and all(
            s in f and "chunks" in f[s] and f[s]["features"].shape == (len(layout[s][0]), dim)
            and f[s]["features"].dtype == np.dtype(dtype) for s in layout)
        if not ok:
            f.close()
            self.log(f"{self.partial}: partial file of another configuration; starting over")
            os.remove(self.partial)
            return None
        for s in layout:
            self._verify(f, s)
        done = sum(int(f[s].attrs["done"]) for s in layout)
        self.log(f"resuming {os.path.basename(self.path)} at image {done} of "
                 f"{sum(len(v[0]) for v in layout.values())} (its rows verified)")
        return f

    def _verify(self, f, s):
        """Trust the rows of split ``s`` only as far as their chunks match their checksums."""
        g, chunk = f[s], int(f.attrs["chunk"])
        done, at, h = int(g.attrs["done"]), 0, hashlib.sha256()
        entries = g["chunks"][()]
        while at < done:
            entry = entries[at // chunk].decode() if at % chunk == 0 else ""
            stop, _, sha = entry.partition(":")
            if not stop or int(stop) > done:
                break
            rows = np.ascontiguousarray(g["features"][at:int(stop)])
            if hashlib.sha256(rows.tobytes()).hexdigest() != sha:
                break
            h.update(rows.tobytes())
            at = int(stop)
        if at != done:
            self.log(f"{self.partial}: rows {at}-{done} of split {s} fail their checksum (a write cut short); "
                     "extracting them again")
            g.attrs["done"] = at
            f.flush()
        self.hashes[s], self.next[s] = h, at

    def _create(self, key, attrs, layout, dim, dtype, chunk):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        f = h5py.File(self.partial, "w", rdcc_nbytes=CHUNK_CACHE_BYTES)
        f.attrs["format"] = FORMAT
        f.attrs["key"] = key
        f.attrs["chunk"] = int(chunk)
        for name, value in attrs.items():
            f.attrs[name] = json.dumps(value, sort_keys=True, default=str)
        for s, (labels, paths) in layout.items():
            g = f.create_group(s)
            n = len(labels)
            g.create_dataset("features", (n, dim), dtype=dtype, chunks=(max(1, min(chunk, n)), dim))
            g.create_dataset("labels", data=np.asarray(labels, dtype=np.int32))
            g.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=h5py.string_dtype())
            g.create_dataset("chunks", (-(-n // chunk),), dtype="S80")
            g.attrs["done"] = 0
            self.hashes[s], self.next[s] = hashlib.sha256(), 0
        f.flush()
        return f

    def done(self, split) -> int:
        return int(self.f[split].attrs["done"])

    def write(self, split, start, rows) -> None:
        """Store rows [start, start+len) of a split (``start`` a multiple of the chunk, in order): the rows
        are flushed first, then their checksum and count; from then on they survive a kill."""
        if start != self.next[split] or start % self.chunk:
            raise ValueError(f"rows of split {split} must be written in order, from a chunk boundary")
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self._check_space(rows.nbytes)  # the disk may have filled since: stop before HDF5 meets it
        stop, sha = start + len(rows), hashlib.sha256(rows.tobytes())
        g = self.f[split]
        try:
            if not np.isfinite(rows).all():
                g.attrs["nonfinite"] = True
            g["features"][start:stop] = rows
            self.f.flush()
            g["chunks"][start // self.chunk] = f"{stop}:{sha.hexdigest()}".encode()
            g.attrs["done"] = stop
            self.f.flush()
        except (OSError, RuntimeError) as e:
            raise self._error(e) from None
        self.hashes[split].update(rows.tobytes())
        self.next[split] = stop

    def _error(self, e) -> PipelineError:
        """One line for a failed write: a full disk says how much more the rest needs."""
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "errno = 28" in str(e):
            return self._no_space(self._left_bytes() + SPACE_MARGIN)
        return PipelineError(f"cannot write {self.partial}: {text}; the partial file is kept: rerun to resume")

    def _no_space(self, more: int) -> PipelineError:
        folder = os.path.dirname(os.path.abspath(self.partial))
        kept = (f"the partial file {os.path.basename(self.partial)} is kept: free space and rerun to resume"
                if os.path.exists(self.partial) else "nothing was written: free space and rerun")
        return PipelineError(f"no space left in {folder}: need about {max(1, -(-more // 2**20))} MiB more for "
                             f"{os.path.basename(self.path)}; {kept}")

    def finish(self) -> str:
        """Record each split's checksum, verify the partial file's record (every row written, none NaN/inf),
        then rename it into place atomically."""
        try:
            for s in self.layout:
                self.f[s].attrs["sha256"] = self.hashes[s].hexdigest()
            self.f.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            self.f.close()
        except (OSError, RuntimeError) as e:
            raise self._error(e) from None
        check_header(self.partial, check_finite=True)
        os.replace(self.partial, self.path)
        return self.path

    def close(self):
        try:
            if self.f.id.valid:
                self.f.close()
        except (OSError, RuntimeError):
            pass  # a file whose write failed: its error is already reported


@contextlib.contextmanager
def locked(path, wait=True, log=print):
    """Hold the exclusive lock of cache file ``path`` (``<path>.lock``, released when the process ends,
    however it ends). A second run waits, saying so, or with ``wait=False`` fails in one line."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: runs are not serialised
        yield
        return
    lock_path = path + LOCK
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = f"another run (pid {_lock_pid(lock_path)}) is writing {path}"
            if not wait:
                raise PipelineError(f"{who}; rerun when it is done (or without WAIT=0 to wait for it)") from None
            log(f"{who}; waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def _lock_pid(lock_path) -> str:
    try:
        with open(lock_path) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def busy(path) -> str | None:
    """"busy (pid N)" while another process holds the lock of cache file ``path``, else None."""
    try:
        import fcntl

        fd = os.open(path + LOCK, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return f"busy (pid {_lock_pid(path + LOCK)})"
    finally:
        os.close(fd)
    return None


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
                if check_finite and not np.isfinite(feats).all():
                    raise _nonfinite(path, s)
                sha = g.attrs.get("sha256")
                if check_complete and sha is not None and hashlib.sha256(feats.tobytes()).hexdigest() != sha:
                    raise PipelineError(f"{path}: split {s} has changed since it was written (checksum "
                                        "mismatch); delete the file and rerun make features")
                splits[s] = Split(feats, g["labels"][()], g["paths"].asstr()[()])
        except (OSError, KeyError, RuntimeError) as e:
            raise PipelineError(f"{path}: corrupt or truncated cache ({str(e).splitlines()[0]}); "
                                "delete it and rerun make features") from None
    return Cache(path, key, meta["config"], meta["class_names"], meta["versions"], created, splits)


def listing(cache_dir) -> list[dict]:
    """One row per cache file (complete or partial): key, source, backbone, size, counts, date."""
    rows = []
    for path in sorted(glob.glob(os.path.join(cache_dir, "*.h5")) + glob.glob(os.path.join(cache_dir, "*.h5" + PARTIAL))):
        row = {"file": os.path.basename(path), "status": "partial" if path.endswith(PARTIAL) else "complete"}
        held = busy(path[:-len(PARTIAL)] if path.endswith(PARTIAL) else path)
        if held and path.endswith(PARTIAL):
            row["status"] = f"partial, {held}"
            rows.append(row)
            continue
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
