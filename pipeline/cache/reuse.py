"""Incremental extraction: an earlier cache of the same backbone configuration lends its rows.

A cache made for another manifest but the same identity otherwise (backbone, weights digest, size, alpha,
interpolation, preprocessing, pooling, dtype, precision, folding, extract version, runtime), the same BATCH
and the same TensorFlow, Keras and NumPy versions holds, in each split's ``content_sha256`` column, the
content hash of every row's image. The rows of images it holds (and that decoded there) are copied; only
new or changed images go through the backbone. The new cache is complete, keyed by its own manifest, and
equal to a from-scratch one: bit for bit where the CPU's kernels give a row the same bytes wherever it sits in
its batch, to float rounding where its place changes the last bits (an AVX2-only CPU: oneDNN blocks the
batch differently there).

A row does not depend on its batch neighbours (measured: the compiled call on the same images among other
neighbours or beside blank padding gives the same bytes), but it can depend on the batch *size*
(efficientnet_lite0 and ResNet50 give other last bits in a batch of one). So every
call runs on exactly BATCH images (:func:`padded`: a split's last, shorter batch is padded with blank images,
as are the new images packed together here), and only a cache made with the same BATCH lends its rows.

:func:`fill` is the loop both engines use for rows taken from a lender and rows computed (the Ray actors run
it on their shards, where nothing is lent it is exactly the from-scratch batching)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time

import h5py
import numpy as np

from pipeline.cache import store
from pipeline.data import images
from pipeline.data.split import SPLITS
from pipeline.errors import PipelineError

HASHES = "content_sha256"  # per-row column: the content hash of the image the row was made from
BLOCK_ROWS = 4096  # rows read at a time when a lender's checksums are verified


def add_hashes(ds, splits, layout) -> dict:
    """Add each row's image content hash to ``layout`` ({split: (labels, paths[, columns])}, in place)."""
    for s, (labels, paths, *more) in list(layout.items()):
        columns = dict(more[0]) if more else {}
        columns[HASHES] = np.asarray([ds.items[i].sha256 for i in splits[s]], dtype="S64")
        layout[s] = (labels, paths, columns)
    return layout


def layout_of(ds, splits) -> dict:
    """{split: (labels, relpaths, {content_sha256})} of the rows ``splits`` ({split: item indices})."""
    return add_hashes(ds, splits, {s: ([ds.items[i].label for i in idx], [ds.items[i].relpath for i in idx])
                                   for s, idx in splits.items()})


def _same_backbone(identity) -> str:
    """What makes a row of an image: the identity without the manifest (and views, which add rows of their
    own), the weights by their digest only."""
    ident = {k: v for k, v in identity.items() if k not in ("manifest", "views")}
    ident["weights"] = {"sha256": (identity.get("weights") or {}).get("sha256")}
    return json.dumps(ident, sort_keys=True)


def _computing_versions(versions) -> str:
    return json.dumps({k: v for k, v in (versions or {}).items() if k not in ("h5py",)}, sort_keys=True)


class Lender:
    """A complete, verified cache file whose rows are copied: ``rows`` maps content sha256 -> (split, row) of
    every image it holds that decoded."""

    def __init__(self, path, rows):
        self.path, self.rows = path, rows
        self.f = None

    def take(self, shas) -> np.ndarray:
        """The rows of these content hashes, in order."""
        if self.f is None:
            self.f = h5py.File(self.path, "r", rdcc_nbytes=store.CHUNK_CACHE_BYTES)
        where = [self.rows[h] for h in shas]
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


def _rows(f) -> dict:
    """{content sha256: (split, row)} of the rows of open cache file ``f`` whose image decoded."""
    rows = {}
    for s in SPLITS:
        if s in f and HASHES in f[s]:
            shas, skipped = f[s][HASHES][()], f[s]["skipped"][()]
            for r in np.flatnonzero(~skipped):
                rows.setdefault(shas[r].decode(), (s, int(r)))
    return rows


def lender_rows(path) -> dict:
    """:func:`_rows` of cache file ``path``."""
    with h5py.File(path, "r") as f:
        return _rows(f)


def _candidate(path, want, versions, batch, needed):
    """(rows lent, created, {sha: (split, row)}) of cache file ``path`` when it can lend rows, else None."""
    try:
        store.check_header(path, check_finite=True)
        with h5py.File(path, "r") as f:
            config = json.loads(f.attrs["config"])
            if _same_backbone(config.get("identity") or {}) != want or config.get("batch") != batch:
                return None
            if _computing_versions(json.loads(f.attrs["versions"])) != versions:
                return None
            if any(HASHES not in f[s] for s in SPLITS if s in f):
                return None  # made before caches recorded their content hashes
            rows, created = _rows(f), str(f.attrs.get("created", ""))
    except (OSError, KeyError, ValueError, PipelineError):
        return None
    hits = sum(1 for h in needed if h in rows)
    return (hits, created, rows) if hits else None


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
    another manifest), verified; None when none holds any of its images. A cache with VIEWS is made from
    scratch."""
    if getattr(plan.cfg, "views", 0):
        return None
    want = _same_backbone(plan.identity)
    versions = _computing_versions(plan.record()["versions"])
    needed = {it.sha256 for it in plan.ds.items}
    found = []
    for path in sorted(glob.glob(os.path.join(plan.cfg.cache_dir, "*.h5"))):
        if os.path.abspath(path) == os.path.abspath(plan.path):
            continue
        c = _candidate(path, want, versions, plan.cfg.batch, needed)
        if c is not None:
            found.append((c[0], c[1], path, c[2]))
    for hits, _, path, rows in sorted(found, key=lambda c: (c[0], c[1]), reverse=True):
        if _verified(path):
            return Lender(path, rows)
        plan.log(f"warning: {path} has changed since it was written (checksum mismatch): its rows are not reused")
    return None


class _Cut:
    """The first ``n`` rows of a call's result (``.numpy()``, as a TensorFlow tensor has)."""

    def __init__(self, out, n):
        self.out, self.n = out, n

    def numpy(self):
        return np.asarray(self.out.numpy())[:self.n]


def padded(call, batch):
    """``call`` run on exactly ``batch`` images: a shorter batch is padded with blank images and their rows cut
    off again, so a row's bytes never depend on how many images share its batch."""

    def run(x):
        n = len(x)
        if n >= batch:
            return call(x)
        full = np.zeros((batch, *x.shape[1:]), x.dtype)
        full[:n] = x
        return _Cut(call(full), n)

    return run


def load_pixels(ds, i, size, interpolation, failed):
    """Item i's pixels: validation and extraction share this one decode. An image that does not decode
    gives blank pixels, its reason recorded in ``failed`` (its row is then marked skipped, never used)."""
    rel = ds.items[i].relpath
    if rel in ds.bad:  # known from an earlier run: not decoded again
        failed[i] = ds.bad[rel]
    else:
        try:
            return ds.load(i, size, interpolation)
        except images.BadImage as e:
            failed[i] = str(e)
    return np.zeros((size, size, 3), np.uint8)


def prepare(plan):
    """The extractor's compiled call for RUNTIME, ready (traced; or compiled by OpenVINO: :meth:`Plan.call`)."""
    return padded(plan.call(), plan.cfg.batch)  # on BATCH images always: a row never depends on the batch size


def fill(ds, splits, ranges, writer, *, size, interpolation, batch, chunk, dtype, call, lender=None,
         after_write=None, progress=None, workers=None, ahead_bytes=32 << 20) -> dict:
    """Write rows ``ranges`` ([(split, start, stop)], ``start`` on a chunk boundary) of the layout ``splits``
    ({split: item indices}) into ``writer``, chunk by chunk in order. Rows of images ``lender`` holds are
    copied from it; the others are decoded ahead (threads, idle priority), packed BATCH at a time and run
    through ``call()`` (the :func:`padded` compiled call, asked for when the first batch is due).
    ``after_write(split, start, stop)`` runs after each chunk is on disk (in the writer thread).
    Returns {"images": computed, "reused": copied, "decoded": [item of every computed row], "failed": {item:
    why its pixels did not decode}, "startup": (seconds, images) at the first batch, "seconds"}."""
    from pipeline.cache.writer import Background
    from pipeline.data import loading

    have = lender.rows if lender is not None else {}
    items = ds.items
    packs, reused = [], 0  # [(split, row)] of at most BATCH rows each, in row order
    for s, a, b in ranges:
        for r in range(a, b):
            if items[splits[s][r]].sha256 in have:
                reused += 1
                continue
            if not packs or len(packs[-1]) == batch:
                packs.append([])
            packs[-1].append((s, r))
    failed, shape = {}, (size, size, 3)

    def load(row):
        return load_pixels(ds, splits[row[0]][row[1]], size, interpolation, failed)

    todo = list(enumerate(packs))
    ahead = max(2, ahead_bytes // (batch * int(np.prod(shape))))
    computed, n_new, startup, fn = {}, 0, None, None
    t0 = time.perf_counter()
    stream = loading.Batches(load, todo, shape, ahead, workers=workers) if todo else None
    background = Background("features-writer")

    def job(s, at, rows, mask):
        def run():
            writer.write(s, at, rows, mask)
            if after_write is not None:
                after_write(s, at, at + len(rows))
        return run

    try:
        for s, a, b in ranges:
            for c in range(a, b, chunk):
                d = min(c + chunk, b)
                shas = [items[splits[s][r]].sha256 for r in range(c, d)]
                mine = [r for r, h in zip(range(c, d), shas) if h not in have]
                while any((s, r) not in computed for r in mine):
                    k, x = next(stream)
                    if fn is None:
                        fn = call()
                    out = fn(x).numpy().astype(dtype, copy=False)
                    for j, row in enumerate(packs[k]):
                        computed[row] = out[j]
                    n_new += len(packs[k])
                    if startup is None:
                        startup = (time.perf_counter() - t0, n_new)
                    if progress is not None:
                        progress(n_new, n_new / (time.perf_counter() - t0))
                rows = np.empty((d - c, writer.dim), writer.dtype)
                mask = np.zeros(d - c, bool)
                for r in mine:
                    rows[r - c] = computed.pop((s, r))
                    mask[r - c] = splits[s][r] in failed
                lent = [j for j, h in enumerate(shas) if h in have]
                if lent:
                    rows[lent] = lender.take([shas[j] for j in lent])
                background.submit(job(s, c, rows, mask))
        background.close()
    finally:
        if stream is not None:
            stream.close()
        background.close()
    decoded = [splits[s][r] for rows in packs for s, r in rows]
    return {"images": n_new, "reused": reused, "decoded": decoded, "failed": failed, "startup": startup or (0.0, 0),
            "seconds": time.perf_counter() - t0}


def settle(plan, splits, bad, decoded, failed, memo):
    """After a cache file is finished: the decode result of every image computed (``decoded``: items,
    ``failed``: {item: reason}) remembered, and the reasons of rows marked skipped into ``ds.bad`` (for the
    skipped report)."""
    ds = plan.ds
    if memo is not None:
        for i in decoded:
            memo.put_decoded(ds.items[i].sha256, failed.get(i))
        memo.save()
    for s, rows in bad.items():
        for r in rows:
            i = splits[s][r]
            ds.bad[ds.items[i].relpath] = failed.get(i) or ds.bad.get(ds.items[i].relpath) or (
                (memo.decoded(ds.items[i].sha256) if memo is not None else None) or "did not decode")


def summary(plan, path, splits, bad, n_new, secs, startup) -> None:
    cfg = plan.cfg
    plan.stats = {"images": n_new, "seconds": secs, "startup_seconds": startup[0], "startup_images": startup[1]}
    counts = ", ".join(f"{s} {len(v) - len(bad.get(s, ()))}" for s, v in splits.items())
    plan.log(f"wrote {path}: {counts} x {plan.dim} {cfg.dtype} features; "
             f"{n_new} images in {secs:.1f} s ({n_new / max(secs, 1e-9):.1f} img/s)")


def extract(plan, lender: Lender) -> str:
    """Extract ``plan``'s cache in this process, copying the rows ``lender`` holds (resuming a partial file)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.cache.writer import Writer
    from pipeline.data.check import CheckMemo
    from pipeline.progress import progress

    ds, cfg, log = plan.ds, plan.cfg, plan.log
    splits = {s: ds.split(s, all_rows=True) for s in ds.splits()}
    writer = Writer(plan.path, plan.key, plan.record(), layout_of(ds, splits), plan.dim, cfg.dtype, plan.chunk,
                    log=log)
    memo = CheckMemo(os.path.join(cfg.cache_dir, "checked-images.json"), ds.max_pixels) if ds.arrays is None else None
    try:
        ranges = [(s, writer.done(s), len(idx)) for s, idx in splits.items()]
        left = [ds.items[splits[s][r]].sha256 for s, a, b in ranges for r in range(a, b)]
        n_lent = sum(h in lender.rows for h in left)
        log(f"reused {n_lent} rows from {os.path.basename(lender.path)}, extracting {len(left) - n_lent}")
        preparing = None
        if n_lent < len(left):  # fold and trace while the first images decode
            pool = ThreadPoolExecutor(1, thread_name_prefix="features-trace")
            preparing = pool.submit(prepare, plan)
            pool.shutdown(wait=False)
        bar = progress(len(left) - n_lent, "image", log) if n_lent < len(left) else None
        res = fill(ds, splits, ranges, writer, size=plan.size, interpolation=cfg.interpolation, batch=cfg.batch,
                   chunk=plan.chunk, dtype=cfg.dtype, call=lambda: preparing.result(), lender=lender,
                   progress=bar.update if bar is not None else None)
        path = writer.finish()
        bad = writer.skipped_rows()
    finally:
        writer.close()
        lender.close()
    settle(plan, splits, bad, res["decoded"], res["failed"], memo)
    summary(plan, path, splits, bad, res["images"], res["seconds"], res["startup"])
    return path
