"""The extractor actor of ``ENGINE=ray`` (:mod:`pipeline.cache.ray_engine`): TensorFlow and the backbone in
the actor's own process, built exactly as in-process; each call writes one shard file
(:mod:`pipeline.cache.shards`), resuming its partial file after the actor died, once it has checked that its
node sees the cache folder (the driver's marker file) and the shard's first image.
Ray, TensorFlow and the backbone are imported lazily, inside the actor's process."""

from __future__ import annotations

import os
import re
import secrets
import time

from pipeline import quiet, records
from pipeline.cache import engine, groups, reuse
from pipeline.cache.shards import Shard, shard_key
from pipeline.cache.writer import Writer
from pipeline.data.sources import Dataset
from pipeline.errors import PipelineError

MARKER = ".ray-marker-"  # CACHE_DIR/.ray-marker-<token>: written by the driver, read by every actor


def mark(cache_dir) -> tuple[str, str]:
    """(path, token) of a new marker file in ``cache_dir``, written by the driver."""
    token = secrets.token_hex(16)
    path = os.path.join(os.path.abspath(cache_dir), MARKER + token)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(token)
    return path, token


def check_sight(marker, image=None):
    """A one-line error naming this node and the path unless it reads the driver's marker ``(path, token)``
    and the image file ``image`` (None: pixels in memory): the cache folder and DATA must be shared."""
    path, token = marker
    try:
        with open(path) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    if not seen:
        raise PipelineError(f"node {_node()} cannot see the cache folder {os.path.dirname(path)} (the driver's "
                            f"marker {os.path.basename(path)} is not there): CACHE_DIR must be on a file system "
                            "every node sees, at the same path")
    if image is None:
        return
    try:
        with open(image, "rb") as f:
            f.read(1)
    except OSError as e:
        raise PipelineError(f"node {_node()} cannot read the image {image} ({e.strerror or type(e).__name__}): "
                            "DATA must be on a file system every node sees, at the same path") from None


def raised_in_init(error) -> str | None:
    """The message of the PipelineError an actor's constructor raised (e.g. other weights on its node), read
    from the text of the actor's death; None for an actor lost otherwise (its process or node)."""
    found = re.findall(r"PipelineError: (.*)", str(error)) if "creation task" in str(error) else []
    return found[-1].strip() if found else None


def part(ds, idx):
    """The dataset of items ``idx`` of ``ds`` only (what one shard's actor needs: paths or pixels, hashes)."""

    items = [ds.items[i] for i in idx]
    rels = {it.relpath for it in items}
    return Dataset(ds.name, ds.root, ds.class_names, items, arrays=None if ds.arrays is None else ds.arrays[idx],
                   max_pixels=ds.max_pixels, bad={r: why for r, why in ds.bad.items() if r in rels})


class Extractor:
    """A Ray actor: TensorFlow imported inside it (start-up noise held back, GPU memory growth on, thread
    counts pinned), the backbone built and folded once, exactly as in-process; :meth:`extract` writes one
    shard."""

    def __init__(self, cfg, weights_sha, dim, size, chunk, threads, marker=None):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

        records.use_keras_home(cfg.keras_home)
        tf = quiet.tensorflow()
        intra = int(os.environ.get("TF_NUM_INTRAOP_THREADS") or threads)
        inter = int(os.environ.get("TF_NUM_INTEROP_THREADS") or max(2, threads))
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        from pipeline.backbones import extractor, registry, runtime

        spec, kind = registry.get(cfg.backbone), getattr(cfg, "runtime", "tensorflow")
        model, base = extractor.build(spec, size, cfg.weights, cfg.pooling, alpha=cfg.alpha or None, seed=cfg.seed,
                                      precision=runtime.keras_precision(kind, cfg.precision),
                                      keras_home=cfg.keras_home)
        sha = registry.weights_digest(base)
        if sha != weights_sha or int(model.output_shape[-1]) != dim:
            raise PipelineError(f"the weights on node {_node()} ({cfg.weights}) differ from the driver's: "
                                "every node needs the same WEIGHTS file (a shared file system)")
        # the in-process engine's call (pipeline.cache.engine.prepare): the same bytes
        self.call = engine.padded(runtime.prepare(model, size, kind, cfg.precision, fold=cfg.fold_batchnorm),
                                 cfg.batch)
        self.cfg, self.dim, self.size, self.chunk, self.threads = cfg, dim, size, chunk, threads
        self.marker = marker
        self.lenders, self.pixels = {}, groups.Pixels(cfg)
        self.device = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"

    def extract(self, sh: Shard, rows, group, path, key, attrs, lender=None) -> dict:
        """Write shard ``sh`` to ``path``, resuming its partial file: the rows of ``group`` (its items: those of
        the dataset ``rows``) through the engine, copying those the cache ``lender`` ((path, kinds) or None)
        lends; what was done."""
        t0 = time.perf_counter()
        cfg = self.cfg
        out = {"shard": sh, "pid": os.getpid(), "node": _node(), "device": self.device, "resumed": 0, "images": 0,
               "reused": 0, "failed": {}}
        if os.path.exists(path):  # a retry of a shard that was finished before its actor died
            return out
        if self.marker is not None:
            check_sight(self.marker, rows.source(0) if rows.arrays is None and rows.items else None)
        try:
            attrs = {**attrs, "shard": {"cache_key": key, "split": sh.split, "start": sh.start, "stop": sh.stop}}
            writer = Writer(path, shard_key(key, sh), attrs, groups.layout(rows, {sh.split: group}), self.dim,
                            cfg.dtype, self.chunk, log=lambda m: None)
            try:
                out["resumed"] = done = writer.done(sh.split)
                res = engine.run(rows, {sh.split: group}, [(sh.split, done, len(group.items))], writer,
                                 lambda: self.call, size=self.size, interpolation=cfg.interpolation,
                                 batch=cfg.batch, chunk=self.chunk, dtype=cfg.dtype, pixels=self.pixels,
                                 lender=self._lender(lender), workers=self.threads)
                writer.finish()
            finally:
                writer.close()
        except PipelineError as e:
            raise PipelineError(f"shard {sh.name} on node {_node()}: {e}") from None
        failed = {rows.items[j].relpath: why for j, why in res["failed"].items()}
        out.update(images=res["images"], reused=res["reused"], failed=failed, seconds=time.perf_counter() - t0)
        return out

    def where(self) -> str:
        """This actor's node: an answer means it started."""
        return _node()

    def _lender(self, lender):
        """The :class:`pipeline.cache.reuse.Lender` of ``(path, kinds)``, opened once per actor."""
        if lender is None:
            return None
        if lender not in self.lenders:
            self.lenders[lender] = reuse.Lender(lender[0], reuse.lender_rows(*lender), lender[1])
        return self.lenders[lender]


def _node() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only a name for messages
        return "?"
