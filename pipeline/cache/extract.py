"""``features``: run a dataset once through a frozen backbone into the HDF5 cache (resumable, keyed).
The Ray engine is imported lazily, with ENGINE=ray only."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from pipeline.memo import NAME as MEMO
from pipeline import lock
from pipeline.cache import engine, groups, reuse
from pipeline.cache.plan import Plan, report_duplicates, report_skipped
from pipeline.cache.writer import Writer
from pipeline.configs import FeaturesConfig
from pipeline.data.check import CheckMemo
from pipeline.progress import progress


def extract(plan: Plan, lender=None) -> str:
    """Extract every group of ``plan``'s cache (:func:`pipeline.cache.groups.of`) into the partial file
    (resuming it) through the engine (:func:`pipeline.cache.engine.run`), copying the rows ``lender`` holds;
    verify and rename into place. BatchNorm is folded and the graph traced (in a thread) while the first
    images decode; the decode result of every image computed is remembered chunk by chunk."""
    ds, cfg, log = plan.ds, plan.cfg, plan.log
    rows = groups.of(plan)
    writer = Writer(plan.path, plan.key, plan.record(), groups.layout(ds, rows), plan.dim, cfg.dtype, plan.chunk,
                    log=log)
    memo = CheckMemo(os.path.join(cfg.cache_dir, MEMO), ds.max_pixels) if ds.arrays is None else None

    def remember(group, start, stop, decoded):  # in the writer thread, once the chunk is on disk
        if memo is not None:
            for i, why in decoded.items():
                memo.put_decoded(ds.items[i].sha256, why)
            memo.save()

    try:
        ranges = [(g, writer.done(g), len(rows[g].items)) for g in rows]
        done, left = sum(a for _, a, _ in ranges), sum(b - a for _, a, b in ranges)
        n_lent = 0 if lender is None else sum(rows[g].key(ds, r) in lender.rows for g, a, b in ranges
                                              for r in range(a, b))
        if lender is not None:
            log(f"reused {n_lent} rows from {os.path.basename(lender.path)}, extracting {left - n_lent}")
        preparing = None
        if n_lent < left:  # fold and trace while the first images decode
            pool = ThreadPoolExecutor(1, thread_name_prefix="features-trace")
            preparing = pool.submit(engine.prepare, plan)
            pool.shutdown(wait=False)
        bar = progress(done + left - n_lent, "image", log)
        res = engine.run(ds, rows, ranges, writer, lambda: preparing.result(), size=plan.size,
                         interpolation=cfg.interpolation, batch=cfg.batch, chunk=plan.chunk, dtype=cfg.dtype,
                         pixels=groups.Pixels(cfg), lender=lender, after_write=remember,
                         progress=lambda n, rate: bar.update(done + n, rate))
        path = writer.finish()
        bad = writer.skipped_rows()
    finally:
        writer.close()
        if lender is not None:
            lender.close()
    engine.settle(plan, rows, bad, res["failed"], memo)
    engine.summary(plan, path, rows, bad, res["images"], res["seconds"], res["startup"])
    return path


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
    """Extract with ENGINE: Ray (:mod:`pipeline.cache.ray_engine`), or in this process; both copy the rows an
    earlier cache of the same backbone configuration lends (:func:`pipeline.cache.reuse.find`)."""
    if plan.cfg.engine == "ray":
        from pipeline.cache import ray_engine

        return ray_engine.extract(plan)
    return extract(plan, reuse.find(plan))


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
