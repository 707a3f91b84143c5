"""``features``: run a dataset once through a frozen backbone into the HDF5 cache (resumable, keyed)."""

from __future__ import annotations

import os
import time

import numpy as np

from pipeline.cache import lock, reuse, store
from pipeline.cache.plan import Plan, report_duplicates, report_skipped
from pipeline.cache.writer import Background, Writer
from pipeline.configs import FeaturesConfig
from pipeline.data import loading
from pipeline.progress import progress

PREFETCH_BYTES = 32 << 20  # decoded pixels kept ready ahead of the backbone (at least 2 batches)


def extract(plan: Plan) -> str:
    """Extract every split into the partial file (resuming it), verify and rename into place.

    Images are decoded by :class:`pipeline.data.loading.Batches` up to PREFETCH_BYTES of pixels ahead of the
    backbone, with the CPU time it leaves idle; while BatchNorm is folded and the graph traced (in a
    thread) and the first batch runs (graph optimisation) they decode ahead. Chunks are written and flushed
    by a writer thread while the next chunk is computed. Rows and their order are exactly those of a serial
    loop over the same compiled call."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.check import CheckMemo

    ds, cfg, log = plan.ds, plan.cfg, plan.log
    splits = {s: ds.split(s, all_rows=True) for s in ds.splits()}  # every row: the manifest's layout
    layout = {s: ([ds.items[i].label for i in idx], [ds.items[i].relpath for i in idx])
              for s, idx in splits.items()}
    views, view_of = _views(plan, splits, layout)
    _tta(plan, splits, layout)
    reuse.add_hashes(ds, splits, layout)  # each row's image content hash: what a later cache reuses rows by
    rec = plan.record()
    writer = Writer(plan.path, plan.key, rec, layout, plan.dim, cfg.dtype, plan.chunk, log=log)
    starts = {s: writer.done(s) for s in splits}
    todo = [((s, k), idx[k:k + cfg.batch])
            for s, idx in splits.items() for k in range(starts[s], len(idx), cfg.batch)]
    total = sum(len(v) for v in splits.values())
    done = sum(starts.values())
    bar = progress(total, "image", log)
    background = Background("features-writer")
    shape = (plan.size, plan.size, 3)
    ahead = max(2, PREFETCH_BYTES // (cfg.batch * int(np.prod(shape))))
    t0, n_new, startup = time.perf_counter(), 0, None
    stream, failed = None, {}
    memo = CheckMemo(os.path.join(cfg.cache_dir, "checked-images.json"), ds.max_pixels) if ds.arrays is None else None

    def write(s, at, pending):
        """Hand a chunk to the writer thread; the decode results of its images are remembered once it is on
        disk."""
        idx = splits[s][at:at + sum(len(p) for p in pending)]
        mask = np.asarray([i in failed for i in idx], bool)
        for i in idx:
            if memo is not None:
                memo.put_decoded(ds.items[i].sha256, failed.get(i))

        def job():
            writer.write(s, at, np.concatenate(pending), mask)
            if memo is not None:
                memo.save()

        background.submit(job)
        return len(idx)

    try:
        stream = loading.Batches(lambda i: reuse.load_pixels(ds, i, plan.size, cfg.interpolation, failed), todo,
                                 shape, ahead)
        preparing, call = None, None
        if todo:  # fold and trace while the workers decode the first batches
            pool = ThreadPoolExecutor(1, thread_name_prefix="features-trace")
            preparing = pool.submit(reuse.prepare, plan)
            pool.shutdown(wait=False)
        split, pending, at = None, [], 0
        for (s, k), x in stream:
            if call is None:
                call = preparing.result()
            if s == store.VIEWS:  # the clean pixels, augmented as view j of that image's content
                rows = range(k, k + len(x))
                x = views.batch(x, [(ds.items[splits[s][r]].sha256, view_of[r]) for r in rows])
            elif s in TTA_SPLITS:  # the clean pixels mirrored left to right, nothing else
                x = np.ascontiguousarray(x[:, :, ::-1])
            if s != split:
                if pending:
                    write(split, at, pending)
                split, pending, at = s, [], k
            pending.append(call(x).numpy().astype(cfg.dtype, copy=False))
            n_new += len(x)
            if startup is None:
                startup = (time.perf_counter() - t0, n_new)
            bar.update(done + n_new, n_new / (time.perf_counter() - t0))
            if sum(len(p) for p in pending) >= plan.chunk:
                at, pending = at + write(s, at, pending), []
        if pending:
            write(split, at, pending)
        background.close()
        path = writer.finish()
        bad = writer.skipped_rows()
    finally:
        if stream is not None:
            stream.close()
        background.close()
        writer.close()
    for s, rows in bad.items():  # this run's failures, and those of an interrupted run it resumed
        for r in rows:
            i = splits[s][r]
            ds.bad[ds.items[i].relpath] = failed.get(i) or ds.bad.get(ds.items[i].relpath) or (
                (memo.decoded(ds.items[i].sha256) if memo is not None else None) or "did not decode")
    secs = time.perf_counter() - t0
    plan.stats = {"images": n_new, "seconds": secs, "startup_seconds": startup[0] if startup else 0.0,
                  "startup_images": startup[1] if startup else 0}
    counts = ", ".join(f"{s} {len(v) - len(bad.get(s, ()))}" for s, v in splits.items())
    log(f"wrote {path}: {counts} x {plan.dim} {cfg.dtype} features; "
        f"{n_new} images in {secs:.1f} s ({n_new / max(secs, 1e-9):.1f} img/s)")
    return path


def _views(plan, splits, layout):
    """With VIEWS=K: the train views' rows added to ``splits`` and ``layout`` (image-major: every view of
    train image 0, then of image 1, ...; columns ``image`` and ``view``); (augmenter, view of each row)."""
    cfg = plan.cfg
    if not cfg.views or "train" not in splits:
        return None, None
    from pipeline.data.augment import Views

    train, k = splits["train"], cfg.views
    splits[store.VIEWS] = [i for i in train for _ in range(k)]
    image = np.repeat(np.arange(len(train), dtype=np.int32), k)
    view = np.tile(np.arange(k, dtype=np.int16), len(train))
    labels, paths = layout["train"]
    layout[store.VIEWS] = (np.repeat(labels, k), np.repeat(np.asarray(paths, dtype=object), k),
                           {"image": image, "view": view})
    return Views(cfg.flip, cfg.rotation, cfg.zoom, cfg.contrast, cfg.seed), view


TTA_SPLITS = frozenset(store.TTA.values())


def _tta(plan, splits, layout):
    """With TTA=1: a group per val and test split (``val_tta``, ``test_tta``) of the same images in the same
    order, each extracted from its image flipped horizontally (rows skipped as the clean split's are)."""
    if not plan.cfg.tta:
        return
    for s, group in store.TTA.items():
        if s in splits:
            splits[group], layout[group] = list(splits[s]), layout[s]


def ensure(plan: Plan) -> str:
    """The cache of ``plan``, extracted unless another run made it meanwhile; one run at a time writes a
    cache file (the others wait for its lock, or fail at once with ``WAIT=0``)."""
    plan.settle()  # the key (hence the file locked) certain first: the extractor built, or its model stored
    with lock.locked(plan.path, wait=plan.cfg.wait, log=plan.log):
        if plan.up_to_date():
            plan.log(f"up to date: {plan.path}")
            return plan.path
        return plan.serve() or _engine(plan)


def _engine(plan: Plan) -> str:
    """Extract with ENGINE: Ray (:mod:`pipeline.cache.ray_engine`), or in this process, copying the rows of an
    earlier cache of the same backbone configuration that holds some of the images (:mod:`pipeline.cache.reuse`)."""
    if plan.cfg.engine == "ray":
        from pipeline.cache import ray_engine

        return ray_engine.extract(plan)
    lender = reuse.find(plan) if not plan.cfg.tta else None  # TTA rows, as views: made from scratch
    return reuse.extract(plan, lender) if lender is not None else extract(plan)


def run(cfg: FeaturesConfig, log=print) -> str:
    """Make sure the cache for ``cfg`` exists; returns its path. Unchanged inputs extract nothing; with VIEWS=K
    a current cache of the same configuration with more views is returned instead (:meth:`Plan.served_by`)."""
    plan = Plan(cfg, log, lazy=True)
    report_duplicates(plan)
    if plan.up_to_date():
        log(f"up to date: {plan.path}")
        path = plan.path
    else:
        path = plan.serve() or ensure(plan)
    report_skipped(plan)  # after extraction: with the images whose pixels did not decode
    return path
