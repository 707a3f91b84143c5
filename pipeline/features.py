"""``features``: run a dataset once through a frozen backbone into the HDF5 cache (resumable, keyed)."""

from __future__ import annotations

import math
import os
import time

import numpy as np

from pipeline import backbones, data, records, store
from pipeline.config import FeaturesConfig, asdict
from pipeline.errors import PipelineError, choose

EXTRACT_VERSION = 1  # bump when extraction changes what it computes: old caches then no longer match
PREFETCH_BYTES = 32 << 20  # decoded pixels kept ready ahead of the backbone (at least 2 batches)
DTYPES = {"float32": np.float32, "float16": np.float16}


class Plan:
    """Everything resolved from a config: the dataset, the extractor, the key and the cache path."""

    def __init__(self, cfg: FeaturesConfig, log=print):
        if cfg.keras_home:
            os.environ["KERAS_HOME"] = os.path.abspath(cfg.keras_home)
        self.cfg = cfg
        self.spec = backbones.get(cfg.backbone)
        choose(cfg.dtype, DTYPES, "dtype")
        from pipeline import extractor, images

        choose(cfg.pooling, extractor.POOLING_LAYERS, "pooling")
        choose(cfg.interpolation, images.INTERPOLATIONS, "interpolation")
        self.size = backbones.resolve_size(self.spec, cfg.size)
        if cfg.batch < 1 or cfg.chunk < 1:
            raise PipelineError("BATCH and CHUNK must be positive")
        self.chunk = math.ceil(cfg.chunk / cfg.batch) * cfg.batch
        os.makedirs(cfg.cache_dir, exist_ok=True)
        self.ds = data.open_source(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.per_class,
                                   cfg.max_pixels, os.path.join(cfg.cache_dir, "checked-images.json"),
                                   progress=True)
        self.model, base = extractor.build(self.spec, self.size, cfg.weights, cfg.pooling,
                                           alpha=cfg.alpha or None, seed=cfg.seed, precision=cfg.precision)
        weights = {"source": cfg.weights if cfg.weights in ("imagenet", "none") else "file",
                   "sha256": backbones.weights_digest(base)}
        if weights["source"] == "file":
            weights["file"] = os.path.abspath(cfg.weights)
        self.dim = int(self.model.output_shape[-1])
        self.identity = {
            "manifest": self.ds.manifest_digest(), "backbone": self.spec.name, "weights": weights,
            "size": self.size, "alpha": cfg.alpha or self.spec.alpha,
            "interpolation": cfg.interpolation, "preprocessing": self.spec.preprocess,
            "pooling": cfg.pooling, "dtype": cfg.dtype, "precision": cfg.precision,
            "fold_batchnorm": cfg.fold_batchnorm,
            "extract_version": EXTRACT_VERSION,
        }
        self.key = records.digest(self.identity)
        stem = f"{self.ds.name}_{self.spec.name}_{self.size}_{cfg.pooling}_{self.key[:12]}"
        self.path = os.path.join(cfg.cache_dir, stem + ".h5")
        self.report_path = os.path.join(cfg.cache_dir, stem + ".skipped.tsv")
        self.log = log
        self.stats = {}  # filled by extract: images, seconds, start-up seconds (trace + first batch)

    def record(self) -> dict:
        """What the cache file records about how it was made."""
        return {
            "config": {**asdict(self.cfg), "size": self.size, "identity": self.identity,
                       "feature_dim": self.dim, "source_root": self.ds.root},
            "class_names": self.ds.class_names,
            "versions": records.versions(("pipeline", "tensorflow", "keras", "h5py", "numpy")),
        }

    def up_to_date(self) -> bool:
        if not os.path.exists(self.path):
            return False
        cache = store.load(self.path, expect_key=self.key, check_finite=False)
        return cache.key == self.key


def _report_skipped(plan):
    ds, log = plan.ds, plan.log
    if ds.skipped:
        lines = ["relpath\treason"] + [f"{rel}\t{why}" for rel, why in ds.skipped]
        records.atomic_write_text(plan.report_path, "\n".join(lines) + "\n")
        reasons = {}
        for _, why in ds.skipped:
            kind = why.split(":")[0].split("(")[0].strip()
            reasons[kind] = reasons.get(kind, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        log(f"warning: skipped {len(ds.skipped)} file(s): {summary}; list in {plan.report_path}")
    if ds.ignored:
        log(f"ignored {ds.ignored} hidden/system file(s)")


class _Background:
    """Runs one callable at a time in a worker thread, in order (HDF5 writes and flushes off the critical
    path); at most one call waits while the next is prepared; an error surfaces at the next call or at
    ``wait``."""

    def __init__(self, name):
        from concurrent.futures import ThreadPoolExecutor

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


def _load(ds, i, size, interpolation):
    """Item i's pixels; a file that no longer decodes (it changed after the scan) is a one-line error."""
    from pipeline import images

    try:
        return ds.load(i, size, interpolation)
    except images.BadImage as e:
        where = ds.items[i].relpath if ds.arrays is not None else ds.source(i)
        raise PipelineError(f"{where}: {e}; it changed after it was checked: run again to rescan") from None


def _prepare(plan):
    """The extractor's compiled call, traced."""
    from pipeline import extractor

    call = extractor.compiled_call(plan.model, plan.size, fold=plan.cfg.fold_batchnorm)
    call.get_concrete_function()
    return call


def extract(plan: Plan) -> str:
    """Extract every split into the partial file (resuming it), verify and rename into place.

    Images are decoded by :class:`pipeline.decode.Batches` up to PREFETCH_BYTES of pixels ahead of the
    backbone, with the CPU time it leaves idle; while BatchNorm is folded and the graph traced (in a
    thread) and the first batch runs (graph optimisation) they decode ahead. Chunks are written and flushed
    by a writer thread while the next chunk is computed. Rows and their order are exactly those of a serial
    loop over the same compiled call."""
    from concurrent.futures import ThreadPoolExecutor

    import keras

    from pipeline import decode

    ds, cfg, log = plan.ds, plan.cfg, plan.log
    splits = {s: ds.split(s) for s in ds.splits()}
    layout = {s: ([ds.items[i].label for i in idx], [ds.items[i].relpath for i in idx])
              for s, idx in splits.items()}
    rec = plan.record()
    writer = store.Writer(plan.path, plan.key, rec, layout, plan.dim, cfg.dtype, plan.chunk, log=log)
    starts = {s: writer.done(s) for s in splits}
    todo = [((s, k), idx[k:k + cfg.batch])
            for s, idx in splits.items() for k in range(starts[s], len(idx), cfg.batch)]
    total = sum(len(v) for v in splits.values())
    done = sum(starts.values())
    bar = keras.utils.Progbar(total, unit_name="image", stateful_metrics=["img/s"])
    background = _Background("features-writer")
    shape = (plan.size, plan.size, 3)
    ahead = max(2, PREFETCH_BYTES // (cfg.batch * int(np.prod(shape))))
    t0, n_new, startup = time.perf_counter(), 0, None
    stream = None
    try:
        stream = decode.Batches(lambda i: _load(ds, i, plan.size, cfg.interpolation), todo, shape, ahead)
        preparing, call = None, None
        if todo:  # fold and trace while the workers decode the first batches
            pool = ThreadPoolExecutor(1, thread_name_prefix="features-trace")
            preparing = pool.submit(_prepare, plan)
            pool.shutdown(wait=False)
        split, pending, at = None, [], 0
        for (s, k), x in stream:
            if call is None:
                call = preparing.result()
            if s != split:
                if pending:
                    background.submit(writer.write, split, at, np.concatenate(pending))
                split, pending, at = s, [], k
            pending.append(call(x).numpy().astype(cfg.dtype, copy=False))
            n_new += len(x)
            if startup is None:
                startup = (time.perf_counter() - t0, n_new)
            bar.update(done + n_new, [("img/s", n_new / (time.perf_counter() - t0))])
            if sum(len(p) for p in pending) >= plan.chunk:
                rows = np.concatenate(pending)
                background.submit(writer.write, s, at, rows)
                at, pending = at + len(rows), []
        if pending:
            background.submit(writer.write, split, at, np.concatenate(pending))
        background.close()
        path = writer.finish()
    finally:
        if stream is not None:
            stream.close()
        background.close()
        writer.close()
    secs = time.perf_counter() - t0
    plan.stats = {"images": n_new, "seconds": secs, "startup_seconds": startup[0] if startup else 0.0,
                  "startup_images": startup[1] if startup else 0}
    counts = ", ".join(f"{s} {len(v)}" for s, v in splits.items())
    log(f"wrote {path}: {counts} x {plan.dim} {cfg.dtype} features; "
        f"{n_new} images in {secs:.1f} s ({n_new / max(secs, 1e-9):.1f} img/s)")
    return path


def run(cfg: FeaturesConfig, log=print) -> str:
    """Make sure the cache for ``cfg`` exists; returns its path. Unchanged inputs extract nothing."""
    plan = Plan(cfg, log)
    _report_skipped(plan)
    if plan.up_to_date():
        log(f"up to date: {plan.path}")
        return plan.path
    return extract(plan)
