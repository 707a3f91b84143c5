"""The plan of a features run: the dataset scanned and split, the extractor built, and the cache key of
everything the features are made from (manifest, backbone, weights digest, size, preprocessing, pooling,
dtype, precision, folding, code version; views and TTA rows when asked for), hence the cache file's path; and
the cache with more views that serves a plan asking for fewer.
The augmentation, the extractor (Keras) and OpenVINO's store are imported lazily: proving a cache current
needs none of them."""

from __future__ import annotations

import csv
import datetime as dt
import glob
import json
import math
import os

import numpy as np

from pipeline import records
from pipeline.backbones import registry
from pipeline.backbones import runtime as runtimes
from pipeline.cache import store, weights
from pipeline.configs import FeaturesConfig, asdict
from pipeline.data import images, sources
from pipeline.memo import NAME as MEMO
from pipeline.errors import PipelineError, choose

EXTRACT_VERSION = 1  # bump when extraction changes what it computes: old caches then no longer match
DTYPES = {"float32": np.float32, "float16": np.float16}
PRECISIONS = ("float32", "bfloat16", "float16")  # backbones.extractor.PRECISIONS, without importing Keras
TTA = "horizontal_flip"  # the test-time augmentation of TTA=1: every val and test image mirrored, nothing else
ENGINES = ("inprocess", "ray")  # ENGINE=ray: pipeline.cache.ray_engine (Ray imported only then)


class Plan:
    """Everything resolved from a config: the dataset, the key and the cache path; the extractor is built
    when first used (``model``), or at once unless ``lazy``: a lazy plan takes the weights digest from the
    cache folder's memo when the weights' files are unchanged, so an up-to-date cache is found without
    TensorFlow. Building checks the digest and corrects the key if the memo was wrong."""

    def __init__(self, cfg: FeaturesConfig, log=print, lazy=False):
        records.use_keras_home(cfg.keras_home)
        self.cfg, self.log = cfg, log
        self.spec = registry.get(cfg.backbone)
        choose(cfg.dtype, DTYPES, "dtype")
        choose(cfg.pooling, dict.fromkeys(registry.POOLINGS), "pooling")
        if cfg.pooling == "gem" and not 0 < cfg.gem_p < float("inf"):
            raise PipelineError(f"GEM_P={cfg.gem_p:g}: the generalised-mean exponent must be a finite number above 0")
        choose(cfg.interpolation, images.INTERPOLATIONS, "interpolation")
        choose(cfg.precision, dict.fromkeys(PRECISIONS), "precision")
        choose(cfg.engine, dict.fromkeys(ENGINES), "engine")
        runtimes.check(cfg.runtime)  # unknown, or its package missing: one line, before the scan
        if cfg.runtime != "tensorflow" and cfg.engine != "inprocess":
            raise PipelineError(f"RUNTIME={cfg.runtime} runs in this process only (ENGINE=inprocess): the "
                                f"ENGINE={cfg.engine} workers run TensorFlow")
        self.size = registry.check_options(self.spec, cfg.size, cfg.weights, cfg.alpha or None)  # before the scan
        if cfg.batch < 1 or cfg.chunk < 1:
            raise PipelineError("BATCH and CHUNK must be positive")
        if cfg.views < 0:
            raise PipelineError(f"VIEWS={cfg.views}: must be 0 (none) or more")
        if cfg.views:
            from pipeline.data import augment

            augment.check(cfg.flip, cfg.rotation, cfg.zoom, cfg.contrast)
        self.chunk = math.ceil(cfg.chunk / cfg.batch) * cfg.batch
        records.writable_dir(cfg.cache_dir, "CACHE_DIR")
        self.ds = sources.open_source(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.per_class,
                                      cfg.max_pixels, os.path.join(cfg.cache_dir, MEMO),
                                      progress=True)
        self._model = None
        self._ov = None  # RUNTIME=openvino: (made_from, its stored model or None)
        self.memo = weights.Memo(cfg.cache_dir)
        hit = self.memo.get(weights.fingerprint(cfg, self.spec, self.size)) if lazy else None
        if hit:
            self._identify(*hit)
        else:
            self._build()
        self.stats = {}  # filled by extract: images, seconds, start-up seconds (trace + first batch)

    @property
    def model(self):
        """The extractor (built on first use)."""
        if self._model is None:
            self._build()
        return self._model

    def settle(self):
        """Make the key certain before the cache file is locked: build the extractor (which checks the memo's
        weights digest), unless RUNTIME=openvino finds its OpenVINO model stored for this identity — made from
        weights of the digest the memo proved — when nothing is built and TensorFlow is not imported."""
        if self._model is None and not self._stored():
            self._build()

    def _stored(self) -> bool:
        """RUNTIME=openvino and the stored OpenVINO model of this identity checks out (read once)."""
        if self.cfg.runtime != "openvino":
            return False
        from pipeline.backbones import openvino_store

        runtimes.check_precision(self.cfg.runtime, self.cfg.precision)
        source = openvino_store.made_from(self.identity)
        if self._ov is None or self._ov[0] != source:
            self._ov = (source, openvino_store.load(self.cfg.cache_dir, source, runtimes.openvino_core(), self.log))
        return self._ov[1] is not None

    def call(self):
        """The extractor's call for RUNTIME, ready to run (traced; or compiled by OpenVINO from its model stored
        in the cache folder, else from the extractor built, converted and stored)."""
        cfg = self.cfg
        if cfg.runtime != "openvino":
            return runtimes.prepare(self.model, self.size, cfg.runtime, cfg.precision, fold=cfg.fold_batchnorm)
        if not self._stored():
            from pipeline.backbones import openvino_store

            self.model  # noqa: B018  built: the weights digest checked (the key corrected if the memo was wrong)
            if not self._stored():
                model = runtimes.convert(self.model, self.size, cfg.fold_batchnorm, runtimes.openvino_core())
                openvino_store.save(cfg.cache_dir, self._ov[0], model, self.log)
                self._ov = (self._ov[0], model)
        return runtimes.OpenVINOCall(self._ov[1], self.size, cfg.precision)

    def _build(self):
        from pipeline import quiet

        tf = quiet.tensorflow()
        from pipeline.backbones import extractor

        cfg = self.cfg
        if cfg.engine == "ray":  # the driver builds the extractor for its key only: the GPUs are the actors'
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:  # TensorFlow already running in this process: its devices stay as they are
                pass
        runtimes.check_precision(cfg.runtime, cfg.precision)  # e.g. bfloat16 on a CPU without it: one line
        model, base = extractor.build(self.spec, self.size, cfg.weights, cfg.pooling, alpha=cfg.alpha or None,
                                      seed=cfg.seed, precision=runtimes.keras_precision(cfg.runtime, cfg.precision),
                                      keras_home=cfg.keras_home, gem_p=cfg.gem_p)
        sha, dim = registry.weights_digest(base), int(model.output_shape[-1])
        if getattr(self, "key", None) is not None and (sha, dim) != (self.identity["weights"]["sha256"], self.dim):
            self.log("the weights differ from what the cache folder remembered: the key is recomputed")
        self._model = model
        self._identify(sha, dim)
        self.memo.put(weights.fingerprint(cfg, self.spec, self.size), sha, dim)

    def _identify(self, sha, dim):
        """The identity, key and paths for weights digest ``sha`` and feature size ``dim``."""
        cfg = self.cfg
        w = {"source": cfg.weights if cfg.weights in ("imagenet", "none") else "file", "sha256": sha}
        if w["source"] == "file":
            w["file"] = os.path.abspath(cfg.weights)
        self.dim = dim
        self.identity = {
            "manifest": self.ds.manifest_digest(), "backbone": self.spec.name, "weights": w,
            "size": self.size, "alpha": cfg.alpha or self.spec.alpha,
            "interpolation": cfg.interpolation, "preprocessing": self.spec.preprocess,
            "pooling": cfg.pooling, "dtype": cfg.dtype, "precision": cfg.precision,
            "fold_batchnorm": cfg.fold_batchnorm,
            "extract_version": EXTRACT_VERSION,
        }
        if cfg.pooling == "gem":  # only then: every other pooling keeps the key it always had
            self.identity["gem_p"] = float(cfg.gem_p)
        if cfg.views:  # only then: a cache without views keeps the key it always had
            self.identity["views"] = {"count": cfg.views, "seed": cfg.seed, "flip": cfg.flip,
                                      "rotation": cfg.rotation, "zoom": cfg.zoom, "contrast": cfg.contrast}
        if cfg.tta:  # only then, as views: a cache without TTA rows keeps its key
            self.identity["tta"] = TTA
        if cfg.runtime != "tensorflow":  # only then: every cache made before RUNTIME existed ran TensorFlow and
            self.identity["runtime"] = cfg.runtime  # keeps the key it always had; another runtime is another key
        self.key = records.digest(self.identity)
        self.stem_prefix = f"{self.ds.name}_{self.spec.name}_{self.size}_{cfg.pooling}_"
        stem = self.stem_prefix + self.key[:12]
        self.path = os.path.join(cfg.cache_dir, stem + ".h5")
        self.report_path = os.path.join(cfg.cache_dir, stem + ".skipped.tsv")
        self.duplicates_path = os.path.join(cfg.cache_dir, stem + ".duplicates.tsv")

    def record(self) -> dict:
        """What the cache file records about how it was made."""
        return {
            "config": {**asdict(self.cfg), "size": self.size, "identity": self.identity,
                       "feature_dim": self.dim, "source_root": self.ds.root},
            "class_names": self.ds.class_names,
            "versions": records.versions(("pipeline", "tensorflow", "keras", "h5py", "numpy")
                                         + ((self.cfg.runtime,) if self.cfg.runtime != "tensorflow" else ())),
        }

    def up_to_date(self) -> bool:
        """True when the complete cache of this key exists and its rows are as written: verified against their
        checksums unless verified before and unchanged since (:func:`store.verified`). A damaged file is moved
        aside, said in one line, so that it is extracted again."""
        before = store.state(self.path)
        if before is None:
            return False
        try:
            store.check_header(self.path, expect_key=self.key)
            if not store.verified(self.path):
                store.verify(self.path)
                store.remember(self.path, before)
        except store.Damaged as e:
            aside = set_aside(self.path, before)
            if aside is not None:
                self.log(f"{e.path}: {e.reason}: moved aside to {os.path.basename(aside)}; extracting again")
            return False
        return True

    def served_by(self) -> str | None:
        """With VIEWS=K: a complete cache in CACHE_DIR whose identity without its views is exactly this plan's,
        with the same augmentation options and SEED and more than K views (the one with the fewest). View j of
        an image depends only on (its content, j, SEED), so its first K views (``store.Views.upto``) are the
        rows this plan would extract. None when there is none."""
        if not self.cfg.views:
            return None
        want = json.loads(json.dumps(self.identity, sort_keys=True, default=str))
        views = want.pop("views")
        count = views.pop("count")
        found = []
        for path in glob.glob(os.path.join(glob.escape(self.cfg.cache_dir), glob.escape(self.stem_prefix) + "*.h5")):
            if os.path.abspath(path) == os.path.abspath(self.path):
                continue
            try:
                ident = dict((store.check_header(path)["config"] or {}).get("identity") or {})
            except PipelineError:
                continue
            other = dict(ident.pop("views", None) or {})
            n = other.pop("count", 0)
            if ident == want and other == views and isinstance(n, int) and n > count:
                found.append((n, path))
        return min(found)[1] if found else None

    def serve(self) -> str | None:
        """:meth:`served_by`, said in one line when found."""
        path = self.served_by()
        if path is not None:
            self.log(f"VIEWS={self.cfg.views}: served by {path}, a cache of this configuration with more views "
                     f"(its first {self.cfg.views} views of every image are used)")
        return path


def set_aside(path, before) -> str | None:
    """Rename damaged cache file ``path`` to ``<name>.damaged-<UTC time>`` beside it (no longer ``*.h5``: never
    read as a cache again), if it is still the file of :func:`store.state` ``before``; its new name, else None."""
    if store.state(path) != before:
        return None  # another run replaced it meanwhile
    aside = f"{path}.damaged-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    return aside


def report_skipped(plan):
    """The files left out (at the scan, or because their pixels did not decode), on screen and in
    ``<stem>.skipped.tsv``."""
    ds, log = plan.ds, plan.log
    refused = ds.refused()
    if refused:
        with records.atomic_path(plan.report_path) as tmp:  # csv-quoted: a tab or newline in a name keeps its row
            with open(tmp, "w", newline="") as f:
                csv.writer(f, delimiter="\t").writerows([("relpath", "reason"), *refused])
        reasons = {}
        for _, why in refused:
            kind = why.split(":")[0].split("(")[0].strip()
            reasons[kind] = reasons.get(kind, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        log(f"warning: skipped {len(refused)} file(s): {summary}; list in {plan.report_path}")
    if ds.ignored:
        log(f"ignored {ds.ignored} hidden/system file(s)")


def duplicates(ds) -> list[tuple[str, str, str, str]]:
    """(content sha256, relpath, class, split) of every image whose exact content also stands in another class
    or another split: a leak between splits, or a label conflict."""
    groups = {}
    for it in ds.items:
        groups.setdefault(it.sha256, []).append(it)
    out = []
    for sha, its in groups.items():
        if len({it.label for it in its}) > 1 or len({it.split for it in its}) > 1:
            out += [(sha, it.relpath, ds.class_names[it.label], it.split) for it in its]
    return out


def report_duplicates(plan) -> list:
    """Report identical images in two classes or two splits on screen and in ``<stem>.duplicates.tsv``; the
    data is never changed: the user decides. A stale report of an earlier run is removed."""
    rows = duplicates(plan.ds)
    if not rows:
        if os.path.exists(plan.duplicates_path):
            os.remove(plan.duplicates_path)
        return rows
    with records.atomic_path(plan.duplicates_path) as tmp:
        with open(tmp, "w", newline="") as f:
            csv.writer(f, delimiter="\t").writerows([("sha256", "relpath", "class", "split"), *rows])
    n = len({r[0] for r in rows})
    plan.log(f"warning: {n} image(s) with identical content stand in two classes or splits ({len(rows)} files); "
             f"list in {plan.duplicates_path}")
    return rows
