"""The one extraction loop (:func:`run`): decode -> call -> rows -> writer, for every way a cache is made (in
this process, each Ray actor's shard, with rows lent by an earlier cache, views, TTA, any RUNTIME).

Images are decoded by :class:`pipeline.data.loading.Batches` in threads, up to ``ahead_bytes`` of pixels ahead
of the backbone; a group's transform (:class:`pipeline.cache.groups.Pixels`: views, TTA) turns a batch's clean
pixels into its rows' pixels; the compiled call runs on exactly BATCH images (:func:`padded`); chunks are
written and flushed by a writer thread while the next is computed. Rows of a group are packed BATCH at a time in
row order, leaving out the rows a lender holds (copied from it instead), so where nothing is lent a row sits
where a serial loop over the group would put it.

A row does not depend on its batch neighbours (measured: the compiled call on the same images among other
neighbours or beside blank padding gives the same bytes), but it can depend on the batch *size*
(efficientnet_lite0 and ResNet50 give other last bits in a batch of one): hence every call on BATCH images, and
only a cache of the same BATCH lends rows. Where a row's place in its batch changes its last bits (AVX2-only
CPUs: oneDNN blocks the batch differently there), lent rows make a cache equal to a from-scratch one to float
rounding; elsewhere bit for bit."""

from __future__ import annotations

import time

import numpy as np

from pipeline.cache.writer import Background
from pipeline.data import images, loading

PREFETCH_BYTES = 32 << 20  # decoded pixels kept ready ahead of the backbone (at least 2 batches)


def ahead_batches(batch: int, size: int, ahead_bytes: int = PREFETCH_BYTES) -> int:
    """How many BATCH-image batches of ``size`` px are decoded ahead of the backbone."""
    return max(2, ahead_bytes // (batch * size * size * 3))


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


def prepare(plan):
    """The extractor's compiled call for RUNTIME, ready (traced; or compiled by OpenVINO: :meth:`Plan.call`)."""
    return padded(plan.call(), plan.cfg.batch)


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


def _lent(ds, groups, ranges, lender) -> dict:
    """{(group, row): lend key} of the rows of ``ranges`` that ``lender`` holds."""
    if lender is None:
        return {}
    keys = ((g, r, groups[g].key(ds, r)) for g, a, b in ranges for r in range(a, b))
    return {(g, r): k for g, r, k in keys if k in lender.rows}


def _packs(ranges, lent, batch) -> list:
    """[(group, rows)]: the rows to compute, BATCH at a time, each pack within one group, in row order."""
    packs = []
    for g, a, b in ranges:
        rows = [r for r in range(a, b) if (g, r) not in lent]
        packs += [(g, rows[k:k + batch]) for k in range(0, len(rows), batch)]
    return packs


def _chunk(ds, group, c, d, computed, lent, lender, failed, writer):
    """(rows, skipped mask, {item: why it failed or None} of the rows computed) of chunk [c, d) of ``group``."""
    rows, mask, decoded = np.empty((d - c, writer.dim), writer.dtype), np.zeros(d - c, bool), {}
    took = [r for r in range(c, d) if (group.name, r) in lent]
    if took:
        rows[[r - c for r in took]] = lender.take([lent[group.name, r] for r in took])
    for r in range(c, d):
        if (group.name, r) not in lent:
            i = group.items[r]
            rows[r - c], mask[r - c], decoded[i] = computed.pop((group.name, r)), i in failed, failed.get(i)
    return rows, mask, decoded


def _job(writer, g, c, rows, mask, decoded, after_write):
    def job():
        writer.write(g, c, rows, mask)
        if after_write is not None:
            after_write(g, c, c + len(rows), decoded)
    return job


def run(ds, groups, ranges, writer, call, *, size, interpolation, batch, chunk, dtype, pixels=None, lender=None,
        after_write=None, progress=None, workers=None, ahead_bytes=PREFETCH_BYTES) -> dict:
    """Write rows ``ranges`` ([(group, start, stop)], ``start`` on a chunk boundary) of ``groups`` ({name:
    :class:`pipeline.cache.groups.Group`} of dataset ``ds``) into ``writer``, chunk by chunk in order. Rows
    ``lender`` holds (by :meth:`Group.key`) are copied from it; the others are decoded ahead, turned into
    their group's pixels by ``pixels(ds, group, rows, x)`` and run through ``call()`` (the :func:`padded`
    compiled call, asked for when the first batch is due). ``after_write(group, start, stop, decoded)`` runs
    after each chunk is on disk (in the writer thread; ``decoded``: {item: why it failed or None} of the rows
    computed). ``progress(images, per_second)`` after each batch. Returns {"images": computed, "reused":
    copied, "failed": {item: why its pixels did not decode}, "startup": (seconds, images) at the first
    batch, "seconds"}."""
    t0 = time.perf_counter()
    lent = _lent(ds, groups, ranges, lender)
    packs = _packs(ranges, lent, batch)
    failed, shape = {}, (size, size, 3)

    def load(row):
        return load_pixels(ds, groups[row[0]].items[row[1]], size, interpolation, failed)

    ahead = ahead_batches(batch, size, ahead_bytes)
    todo = [(k, [(g, r) for r in rows]) for k, (g, rows) in enumerate(packs)]
    stream = loading.Batches(load, todo, shape, ahead, workers=workers) if todo else None
    background = Background("features-writer")
    computed, n_new, startup, fn = {}, 0, None, None
    try:
        for g, a, b in ranges:
            for c in range(a, b, chunk):
                d = min(c + chunk, b)
                while any((g, r) not in computed and (g, r) not in lent for r in range(c, d)):
                    k, x = next(stream)
                    fn = fn or call()
                    pg, rows = packs[k]
                    if pixels is not None:
                        x = pixels(ds, groups[pg], rows, x)
                    out = fn(x).numpy().astype(dtype, copy=False)
                    computed.update(((pg, r), out[j]) for j, r in enumerate(rows))
                    n_new += len(rows)
                    startup = startup or (time.perf_counter() - t0, n_new)
                    if progress is not None:
                        progress(n_new, n_new / (time.perf_counter() - t0))
                rows_, mask, decoded = _chunk(ds, groups[g], c, d, computed, lent, lender, failed, writer)
                background.submit(_job(writer, g, c, rows_, mask, decoded, after_write))
        background.close()
    finally:
        if stream is not None:
            stream.close()
        background.close()
    return {"images": n_new, "reused": len(lent), "failed": failed, "startup": startup or (0.0, 0),
            "seconds": time.perf_counter() - t0}


def settle(plan, groups, bad, failed, memo, decoded=()):
    """After a cache file is finished: the decode result of the items ``decoded`` remembered in ``memo`` (those
    not remembered chunk by chunk), and the reasons of rows marked skipped into ``ds.bad`` (for the skipped
    report)."""
    ds = plan.ds
    if memo is not None:
        for i in decoded:
            memo.put_decoded(ds.items[i].sha256, failed.get(i))
        memo.save()
    for g, rows in bad.items():
        for r in rows:
            i = groups[g].items[r]
            ds.bad[ds.items[i].relpath] = failed.get(i) or ds.bad.get(ds.items[i].relpath) or (
                (memo.decoded(ds.items[i].sha256) if memo is not None else None) or "did not decode")


def summary(plan, path, groups, bad, n_new, secs, startup) -> None:
    """``plan.stats`` and the one line saying what was written."""
    cfg = plan.cfg
    plan.stats = {"images": n_new, "seconds": secs, "startup_seconds": startup[0], "startup_images": startup[1]}
    counts = ", ".join(f"{g} {len(v.items) - len(bad.get(g, ()))}" for g, v in groups.items())
    plan.log(f"wrote {path}: {counts} x {plan.dim} {cfg.dtype} features; "
             f"{n_new} images in {secs:.1f} s ({n_new / max(secs, 1e-9):.1f} img/s)")
