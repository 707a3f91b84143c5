"""The feature cache: one HDF5 file per key, written to a partial file chunk by chunk, resumable,
verified and renamed into place when complete.

Layout: root attributes ``format``, ``key``, ``config`` (JSON), ``class_names`` (JSON), ``versions``
(JSON), ``created``, ``chunk``; one group per split with ``features`` (N, D), ``labels`` (N,), ``paths``
(N,), ``skipped`` (N,), ``chunks`` ("stop:sha256" of every write, at index start // chunk), attribute
``done`` (rows written and flushed: recorded only after the rows are on disk) and, once complete, ``sha256``
of all its feature bytes (checked on every load). Views of the train images are the group ``train_views``
(columns ``image``, ``view``); TTA rows the groups ``val_tta`` and ``test_tta``, row for row their split. A
resumed partial file is re-verified chunk by chunk before it is trusted.
Writers of one file hold an exclusive lock on ``<file>.lock`` (:func:`locked`). ``features`` verifies a complete
file's chunk checksums (:func:`verify`) once per state of the file on disk (:func:`verified`, :func:`remember`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from pipeline import lock, memo
from pipeline.errors import PipelineError

FORMAT = "pipeline-features/1"
PARTIAL = ".partial"
CHUNK_CACHE_BYTES = 64 << 20
VIEWS = "train_views"  # the group of augmented views of the train images
TTA = {"val": "val_tta", "test": "test_tta"}  # TTA=1: each split's images flipped, row for row


@dataclass
class Split:
    """One split's rows: ``features`` (N, D) (also ``X``), ``labels`` (N,) (also ``y``), ``paths`` (N,)."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    X = property(lambda self: self.features)  # noqa: N815 - scikit-learn's name
    y = property(lambda self: self.labels)


@dataclass
class Views(Split):
    """Augmented views of the train images: each row's ``image`` (its clean row in ``train``) and ``view``."""

    image: np.ndarray = None
    view: np.ndarray = None

    def upto(self, k: int) -> "Views":
        """The first ``k`` views of every image (a cache with more views serves fewer)."""
        keep = self.view < k
        return Views(self.features[keep], self.labels[keep], self.paths[keep], self.image[keep], self.view[keep])


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
    views: "Views | None" = None  # augmented views of the train images, when the cache has them
    tta: dict = field(default_factory=dict)  # TTA=1: {"val", "test": Split of the flipped rows, row for row}

    def _split(self, name) -> Split:
        if name not in self.splits:
            raise PipelineError(f"{self.path}: no {name} split (it has {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    @property
    def train(self) -> Split:
        return self._split("train")

    @property
    def val(self) -> Split:
        return self._split("val")

    @property
    def test(self) -> Split:
        return self._split("test")


class Damaged(PipelineError):
    """A cache file that cannot be read back as written: its ``reason``, after its path."""

    def __init__(self, path, reason, remedy="rerun make features (it moves the file aside and extracts again)"):
        super().__init__(f"{path}: {reason}; {remedy}")
        self.path, self.reason = path, reason


def open_file(path, mode):
    try:
        return h5py.File(path, mode, rdcc_nbytes=CHUNK_CACHE_BYTES)
    except OSError as e:
        raise Damaged(path, f"not a readable HDF5 cache file ({str(e).splitlines()[0]})") from None


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
    return Damaged(path, f"split {s} has {int(g.attrs['done'])} of {g['labels'].shape[0]} rows: the file is "
                         "incomplete")


def _corrupt(path, e):
    return Damaged(path, f"corrupt or truncated cache ({str(e).splitlines()[0]})")


def _nonfinite(path, s):
    return PipelineError(f"{path}: split {s} has NaN/inf features; the backbone or weights are "
                         "broken for this input: check WEIGHTS/SIZE, delete the file and rerun")


def check_header(path, expect_key=None, check_finite=False) -> dict:
    """The record of a complete cache file (format, key, every split's rows written; with ``check_finite``
    no NaN/inf row flagged by the writer), read without its rows: any damage is a one-line error."""
    if not os.path.exists(path):
        raise PipelineError(f"{path}: no such cache file; run make features")
    with open_file(path, "r") as f:
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
            raise _corrupt(path, e) from None
    return meta


def load(path, expect_key=None, check_complete=True, check_finite=True, budget=None) -> Cache:
    """Load a complete cache into memory after checking its record; any damage is a one-line error. A file
    :func:`verified` before is not hashed again. ``budget`` (bytes): when a float64 copy of its rows (what
    scikit-learn heads make) would not fit it, the splits are lazy views instead (:mod:`pipeline.cache.lazy`)."""
    if not os.path.exists(path):
        raise PipelineError(f"{path}: no such cache file; run make features")
    from pipeline.cache import lazy  # imported lazily: pipeline.cache.lazy imports this module
    if budget is not None and lazy.footprint(path) > budget:
        return lazy.open_lazy(path, expect_key)
    trusted = check_complete and verified(path)
    with open_file(path, "r") as f:
        meta = _attrs(f, path)
        key, created = _check_key(f, path, expect_key), f.attrs.get("created", "")
        splits, kept = {}, {}
        try:
            for s in f:
                g = f[s]
                n = g["labels"].shape[0]
                if check_complete and int(g.attrs["done"]) != n:
                    raise _incomplete(path, s, g)
                feats = np.empty(g["features"].shape, g["features"].dtype)
                if n:
                    g["features"].read_direct(feats)
                sha = g.attrs.get("sha256")  # before the NaN test: changed bytes are said as such
                if check_complete and not trusted and sha is not None and \
                        hashlib.sha256(feats.tobytes()).hexdigest() != sha:
                    raise Damaged(path, f"split {s} has changed since it was written (checksum mismatch)")
                keep = ~g["skipped"][()] if "skipped" in g else np.ones(n, bool)  # images that did not decode
                if check_finite and not np.isfinite(feats[keep]).all():
                    raise _nonfinite(path, s)
                kept[s] = keep
                splits[s] = group(g, s, feats, keep)
        except (OSError, KeyError, RuntimeError) as e:
            raise _corrupt(path, e) from None
    return assemble(path, key, meta, created, splits, kept)


def group(g, s, feats, keep) -> Split:
    """Group ``g`` (split or extra group ``s``): its ``keep`` rows, ``feats`` its features or lazy kept rows."""
    labels, paths = g["labels"][()][keep], g["paths"].asstr()[()][keep]
    if isinstance(feats, np.ndarray) and not keep.all():
        feats = feats[keep]
    if s == VIEWS:
        return Views(feats, labels, paths, g["image"][()][keep], g["view"][()][keep])
    return Split(feats, labels, paths)


def assemble(path, key, meta, created, splits, kept) -> Cache:
    """The :class:`Cache` of a file's groups: views and TTA rows apart from the splits, and checked."""
    views = splits.pop(VIEWS, None)
    tta = {s: splits.pop(group) for s, group in TTA.items() if group in splits}
    for s, flipped in tta.items():
        if s not in splits or not np.array_equal(flipped.paths, splits[s].paths):
            raise PipelineError(f"{path}: group {TTA[s]} is not row for row the {s} split; delete the file and "
                                "rerun make features")
    if views is not None and "train" in kept:  # clean rows left out: views point at the rows that stay
        views.image = (np.cumsum(kept["train"]) - 1)[views.image]
    return Cache(path, key, meta["config"], meta["class_names"], meta["versions"], created, splits, views, tta)


def verify(path) -> None:
    """Every split's rows of a complete file against the checksums recorded as they were written: each chunk's
    (its rows and skipped flags, read one at a time) and the split's (what :func:`load` checks). A mismatch, or
    a part that cannot be read, is :class:`Damaged` naming the rows."""
    with open_file(path, "r") as f:
        try:
            chunk = int(f.attrs.get("chunk", 0))
            for s in f:
                g = f[s]
                n, total = g["labels"].shape[0], hashlib.sha256()
                entries = g["chunks"][()] if "chunks" in g and chunk else []
                at = 0
                while at < n and len(entries):
                    stop, _, sha = entries[at // chunk].decode().partition(":") if at % chunk == 0 else ("", "", "")
                    if not stop.isdigit() or not at < int(stop) <= n:
                        raise Damaged(path, f"split {s}: the checksum record of rows from {at} is damaged")
                    rows, mask = (np.ascontiguousarray(g[c][at:int(stop)]) for c in ("features", "skipped"))
                    if hashlib.sha256(rows.tobytes() + mask.tobytes()).hexdigest() != sha:
                        raise Damaged(path, f"rows {at}-{stop} of split {s} have changed since they were written "
                                            "(checksum mismatch)")
                    total.update(rows.tobytes())
                    at = int(stop)
                for a in range(0, n if not len(entries) else 0, 4096):  # no chunk checksums: the split's only
                    total.update(np.ascontiguousarray(g["features"][a:a + 4096]).tobytes())
                if g.attrs.get("sha256") not in (None, total.hexdigest()):
                    raise Damaged(path, f"split {s} has changed since it was written (checksum mismatch)")
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            raise _corrupt(path, e) from None


def state(path) -> list | None:
    """What identifies a file's bytes unchanged: size, mtime, inode, ctime, device (None when it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev]


def _verified_memo(path) -> memo.Table:
    """The cache folder's memo of files verified: {abspath: their :func:`state` then}."""
    return memo.Table(os.path.join(os.path.dirname(os.path.abspath(path)), memo.NAME), "verified")


def verified(path) -> bool:
    """Whether ``path`` passed :func:`verify` and is as it was then (size, mtime, inode, ctime, device)."""
    now = state(path)
    return now is not None and _verified_memo(path).get(os.path.abspath(path)) == now


def remember(path, before=None) -> None:
    """Record that ``path`` passed :func:`verify` (as it was in ``before``, its :func:`state` before verifying,
    when given: a file changed meanwhile is not remembered). A memo that cannot be written costs a verification."""
    now = state(path)
    if now is None or before not in (None, now):
        return
    table = _verified_memo(path)
    table.put(os.path.abspath(path), now)
    table.save()


def listing(cache_dir) -> list[dict]:
    """One row per cache file (complete or partial): key, source, backbone, size, counts, date."""
    rows = []
    for path in sorted(glob.glob(os.path.join(cache_dir, "*.h5")) + glob.glob(os.path.join(cache_dir, "*.h5" + PARTIAL))):
        row = {"file": os.path.basename(path), "status": "partial" if path.endswith(PARTIAL) else "complete"}
        held = lock.busy(path[:-len(PARTIAL)] if path.endswith(PARTIAL) else path)
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
