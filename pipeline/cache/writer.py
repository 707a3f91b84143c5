"""Writing one cache file: to ``<file>.partial``, chunk by chunk (rows flushed before their checksum and count),
resumable after a kill (what it holds is re-verified first), renamed into place when complete and verified.
A full disk is a one-line error before HDF5 meets it."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

from pipeline.cache.store import CHUNK_CACHE_BYTES, FORMAT, PARTIAL, check_header
from pipeline.errors import PipelineError

SPACE_MARGIN = 1 << 20  # free bytes kept beyond the rows: HDF5's own metadata must never meet a full disk


class Writer:
    """Writes one cache file; resumes a partial file left by a killed run with the same key, after checking
    every chunk it holds against its recorded checksum (rows that fail are extracted again)."""

    def __init__(self, path, key, attrs, layout, feature_dim, dtype="float32", chunk=256, log=print):
        """``layout``: {split: (labels, paths[, {column: values}])} in extraction order."""
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
        left = sum(len(v[0]) - self.next.get(s, 0) for s, v in self.layout.items())
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
            s in f and "chunks" in f[s] and "skipped" in f[s] and f[s]["features"].shape == (len(layout[s][0]), dim)
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
            mask = np.ascontiguousarray(g["skipped"][at:int(stop)])
            if hashlib.sha256(rows.tobytes() + mask.tobytes()).hexdigest() != sha:
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
        for s, (labels, paths, *more) in layout.items():
            g = f.create_group(s)
            n = len(labels)
            for name, values in (more[0] if more else {}).items():  # per-row columns (train views' image, view)
                g.create_dataset(name, data=np.asarray(values))
            g.create_dataset("features", (n, dim), dtype=dtype, chunks=(max(1, min(chunk, n)), dim))
            g.create_dataset("labels", data=np.asarray(labels, dtype=np.int32))
            g.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=h5py.string_dtype())
            g.create_dataset("chunks", (-(-n // chunk),), dtype="S80")
            g.create_dataset("skipped", (n,), dtype=bool)  # rows of images whose pixels did not decode
            g.attrs["done"] = 0
            self.hashes[s], self.next[s] = hashlib.sha256(), 0
        f.flush()
        return f

    def done(self, split) -> int:
        return int(self.f[split].attrs["done"])

    def write(self, split, start, rows, skipped=None) -> None:
        """Store rows [start, start+len) of a split (``start`` a multiple of the chunk, in order), and which of
        them are of images that did not decode (``skipped``, a bool per row): the rows are flushed first,
        then their checksum and count; from then on they survive a kill."""
        if start != self.next[split] or start % self.chunk:
            raise ValueError(f"rows of split {split} must be written in order, from a chunk boundary")
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        mask = np.zeros(len(rows), bool) if skipped is None else np.ascontiguousarray(skipped, bool)
        self._check_space(rows.nbytes)  # the disk may have filled since: stop before HDF5 meets it
        stop, sha = start + len(rows), hashlib.sha256(rows.tobytes() + mask.tobytes())
        g = self.f[split]
        try:
            if not np.isfinite(rows[~mask]).all():
                g.attrs["nonfinite"] = True
            g["features"][start:stop] = rows
            g["skipped"][start:stop] = mask
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

    def skipped_rows(self) -> dict:
        """{split: row indices marked skipped} of the finished file."""
        with h5py.File(self.path, "r") as f:
            return {s: np.flatnonzero(f[s]["skipped"][()]).tolist() for s in self.layout}

    def close(self):
        try:
            if self.f.id.valid:
                self.f.close()
        except (OSError, RuntimeError):
            pass  # a file whose write failed: its error is already reported


class Background:
    """Runs one callable at a time in a worker thread, in order (HDF5 writes and flushes off the critical
    path); at most one call waits while the next is prepared; an error surfaces at the next call or at
    ``wait``."""

    def __init__(self, name):

        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.pending = None

    def submit(self, fn, *args):
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self):
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self):
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)
