"""The shared pieces of one bench run, each made once when a section first needs it: the images, the
extractor, the pixels in memory, the bare and folded compiled calls, OpenVINO's call (when installed), the
decode-only pass, and the paired end-to-end runs.
What a measurement needs (TensorFlow, Keras, the steps it runs) is imported lazily, in the function that
measures: ``make bench`` imports only the sections it runs."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from pipeline import records
from pipeline.backbones import registry
from pipeline.bench.common import Images, quality_entries, quiet, sections, timed
from pipeline.configs import BenchConfig
from pipeline.errors import PipelineError


class Context:
    """The config, the work folder and the pieces sections share, each made once when first needed."""

    def __init__(self, cfg: BenchConfig, log=print):
        if cfg.n < 2 or cfg.repeats < 1 or cfg.warmup < 0 or cfg.memory_factor < 1:
            raise PipelineError("N >= 2, REPEATS >= 1, WARMUP >= 0 and MEMORY_FACTOR >= 1 are needed")
        if cfg.batch < 1:
            raise PipelineError("BATCH must be positive")
        self.cfg, self.log = cfg, log
        self.sections = sections(cfg.sections)
        self.spec = registry.get(cfg.backbone)
        self.size = registry.resolve_size(self.spec, cfg.size)
        if "quality" in self.sections:
            self.quality = quality_entries(cfg.quality)
        records.use_keras_home(cfg.keras_home)
        self.work = tempfile.mkdtemp(prefix="pipeline-bench-")
        self.results, self.cache = {}, {}

    # -- shared pieces, made once when a section first needs them
    def images(self) -> Images:
        if "images" not in self.cache:
            self.cache["images"] = Images(self.cfg, self.work, self.cfg.n, "images", self.log)
        return self.cache["images"]

    def extractor(self, precision=None):
        """The extractor built as extraction builds it (in PRECISION for TensorFlow, float32 for another
        RUNTIME, which computes in PRECISION itself), or in ``precision``."""
        from pipeline.backbones import runtime

        cfg = self.cfg
        precision = precision or runtime.keras_precision(cfg.runtime, cfg.precision)
        key = "model" if precision == runtime.keras_precision(cfg.runtime, cfg.precision) else f"model-{precision}"
        if key not in self.cache:
            from pipeline.backbones import extractor

            model, _ = extractor.build(self.spec, self.size, cfg.weights, cfg.pooling, alpha=cfg.alpha or None,
                                       seed=cfg.seed, precision=precision, keras_home=cfg.keras_home,
                                       gem_p=cfg.gem_p)
            self.cache[key] = model
        return self.cache[key]

    def pixels(self):
        if "pixels" not in self.cache:
            self.cache["pixels"] = self.images().arrays(self.size, self.cfg.interpolation)
        return self.cache["pixels"]

    def inference(self, folded=False):
        """The extractor's inference function, as extraction makes it when ``folded``; made once."""
        key = "inference_folded" if folded else "inference"
        if key not in self.cache:
            from pipeline.backbones import extractor

            self.cache[key] = extractor.inference(self.extractor(), fold=folded)
        return self.cache[key]

    def folds(self) -> int:
        """How many BatchNorm layers extraction folds (none in reduced precision)."""
        return self.inference(folded=True).folds

    def batches(self):
        """The N images in memory as BATCH-sized uint8 arrays (a last short batch filled up cyclically)."""
        if "batches" not in self.cache:
            x, b = self.pixels(), self.cfg.batch
            n_batches = -(-len(x) // b)
            idx = np.arange(n_batches * b) % len(x)
            self.cache["batches"] = [x[idx[i * b:(i + 1) * b]] for i in range(n_batches)]
        return self.cache["batches"]

    def bare_pass(self, folded=False):
        """(images per pass, pass()) of the compiled call on the N images already in memory; pass() returns
        their features. ``folded``: the same call with BatchNorm folded, as extraction makes it."""
        key = "bare_pass_folded" if folded else "bare_pass"
        if key not in self.cache:
            import tensorflow as tf

            cfg, n = self.cfg, len(self.pixels())
            b = cfg.batch
            spec = tf.TensorSpec((b, self.size, self.size, 3), tf.uint8)
            call = tf.function(self.inference(folded), input_signature=[spec])
            batches = [tf.constant(x) for x in self.batches()]

            def one_pass():
                return np.concatenate([call(t).numpy() for t in batches])[:n]

            self.cache[key] = (len(batches) * b, one_pass)
        return self.cache[key]

    def openvino(self):
        """OpenVINO's call of the extractor (:class:`pipeline.backbones.runtime.OpenVINOCall`) in PRECISION,
        converted from the graph extraction converts; None (said once) when openvino is not installed or
        cannot compute in PRECISION here. Made once."""
        if "openvino" not in self.cache:
            from pipeline.backbones import runtime

            cfg, call = self.cfg, None
            try:
                runtime.check_precision("openvino", cfg.precision)
                call = runtime.prepare(self.extractor("float32"), self.size, "openvino", cfg.precision,
                                       fold=cfg.fold_batchnorm)
            except PipelineError as e:
                self.log(f"bench: no OpenVINO figures: {e}")
            self.cache["openvino"] = call
        return self.cache["openvino"]

    def openvino_pass(self):
        """(images per pass, pass()) of OpenVINO's call on the bare pass' batches; None without OpenVINO."""
        if "openvino_pass" not in self.cache:
            call, n = self.openvino(), len(self.pixels())
            batches = self.batches()

            def one_pass():
                return np.concatenate([call(x).numpy() for x in batches])[:n]

            self.cache["openvino_pass"] = (len(batches) * self.cfg.batch, one_pass) if call is not None else None
        return self.cache["openvino_pass"]

    def decode_pass(self):
        """pass() decoding and resizing the N images as extraction does (``load_resized``), in a pool of one
        thread per core, nothing else running: the decoder's own throughput."""
        imgs = self.images()
        return lambda: imgs.arrays(self.size, self.cfg.interpolation)

    def bare(self):
        """(images per timed pass, seconds per pass, features of the N images) of the compiled call."""
        if "bare" not in self.cache:
            n_pass, one_pass = self.bare_pass()
            secs, feats = timed(one_pass, self.cfg.repeats, max(self.cfg.warmup, 1))
            self.cache["bare"] = (n_pass, secs, feats)
        return self.cache["bare"]

    def _features_run(self, imgs, k):
        """(whole seconds, extraction seconds, plan seconds, path, its config, (steady img/s, start-up s) or None)
        of one features run into a fresh cache folder."""
        from pipeline.cache import extract as features

        fcfg = imgs.fcfg(self.cfg, os.path.join(self.work, f"e2e-{k}"))
        t0 = time.perf_counter()
        with quiet():
            plan = features.Plan(fcfg, log=lambda m: None)
            if plan.up_to_date():
                raise PipelineError(f"{plan.path}: unexpectedly up to date")
            t1 = time.perf_counter()
            path = features.extract(plan)
        t2 = time.perf_counter()
        st = getattr(plan, "stats", None) or {}
        steady = None
        if st.get("images", 0) > st.get("startup_images", 0) and st.get("seconds", 0) > st["startup_seconds"]:
            steady = ((st["images"] - st["startup_images"]) / (st["seconds"] - st["startup_seconds"]),
                      st["startup_seconds"])
        return t2 - t0, t2 - t1, t1 - t0, path, fcfg, steady

    def e2e(self, paired=False):
        """Seconds of the whole features run and of its extraction phase, per repeat, fresh cache each.
        ``paired``: each run follows a timed bare pass (``self.cache["bare"]``), when extraction folds
        BatchNorm a timed pass of the folded call (``self.cache["bare_folded"]``), with OpenVINO installed a
        pass of its call (``self.cache["bare_openvino"]``) and a decode-only pass (``self.cache["decode"]``),
        so that the figures of a repeat see the same load from other processes."""
        if "e2e" not in self.cache:
            imgs, totals, extracts, plans, paths = self.images(), [], [], [], []

            steadies, bare_secs, feats = [], [], None
            folding = paired and self.cfg.fold_batchnorm and self.folds() > 0
            others = {}  # more passes timed in each repeat: name -> pass()
            if paired:
                n_pass, one_pass = self.bare_pass()
                if folding:
                    others["bare_folded"] = self.bare_pass(folded=True)[1]
                if self.openvino_pass() is not None:
                    others["bare_openvino"] = self.openvino_pass()[1]
                others["decode"] = self.decode_pass()
                for _ in range(max(self.cfg.warmup, 1)):
                    feats = one_pass()
                    for fn in others.values():
                        fn()
            other_secs = {name: [] for name in others}
            for k in range(self.cfg.warmup + self.cfg.repeats):
                if paired and k >= self.cfg.warmup:
                    t0 = time.perf_counter()
                    feats = one_pass()
                    bare_secs.append(time.perf_counter() - t0)
                    for name, fn in others.items():
                        t0 = time.perf_counter()
                        fn()
                        other_secs[name].append(time.perf_counter() - t0)
                total, ext, plan_s, path, fcfg, steady = self._features_run(imgs, k)
                if k >= self.cfg.warmup:
                    totals.append(total), extracts.append(ext), plans.append(plan_s), paths.append((path, fcfg))
                    if steady:
                        steadies.append(steady)
            self.cache["e2e"] = (totals, extracts, plans, paths)
            self.cache["steady"] = steadies
            if paired:
                self.cache["bare"] = (n_pass, bare_secs, feats)
            self.cache.update(other_secs)
        return self.cache["e2e"]
