"""The shared pieces of one bench run, each made once when a section first needs it: the images, the
extractor, the pixels in memory, the bare and folded compiled calls, and the paired end-to-end runs."""

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

    def extractor(self):
        if "model" not in self.cache:
            from pipeline.backbones import extractor

            cfg = self.cfg
            model, _ = extractor.build(self.spec, self.size, cfg.weights, cfg.pooling, alpha=cfg.alpha or None,
                                       seed=cfg.seed, precision=cfg.precision, keras_home=cfg.keras_home)
            self.cache["model"] = model
        return self.cache["model"]

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

    def bare_pass(self, folded=False):
        """(images per pass, pass()) of the compiled call on the N images already in memory; pass() returns
        their features. ``folded``: the same call with BatchNorm folded, as extraction makes it."""
        key = "bare_pass_folded" if folded else "bare_pass"
        if key not in self.cache:
            import tensorflow as tf

            cfg, x = self.cfg, self.pixels()
            b = cfg.batch
            spec = tf.TensorSpec((b, self.size, self.size, 3), tf.uint8)
            call = tf.function(self.inference(folded), input_signature=[spec])
            n_batches = -(-len(x) // b)
            idx = np.arange(n_batches * b) % len(x)  # a last short batch is filled up cyclically
            batches = [tf.constant(x[idx[i * b:(i + 1) * b]]) for i in range(n_batches)]

            def one_pass():
                return np.concatenate([call(t).numpy() for t in batches])[:len(x)]

            self.cache[key] = (n_batches * b, one_pass)
        return self.cache[key]

    def bare(self):
        """(images per timed pass, seconds per pass, features of the N images) of the compiled call."""
        if "bare" not in self.cache:
            n_pass, one_pass = self.bare_pass()
            secs, feats = timed(one_pass, self.cfg.repeats, max(self.cfg.warmup, 1))
            self.cache["bare"] = (n_pass, secs, feats)
        return self.cache["bare"]

    def e2e(self, paired=False):
        """Seconds of the whole features run and of its extraction phase, per repeat, fresh cache each.
        ``paired``: each run follows a timed bare pass (``self.cache["bare"]``) and, when extraction folds
        BatchNorm, a timed pass of the folded call (``self.cache["bare_folded"]``), so that the figures of a
        repeat see the same load from other processes."""
        if "e2e" not in self.cache:
            from pipeline.cache import extract as features

            imgs, totals, extracts, plans, paths = self.images(), [], [], [], []

            def one(k):
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

            steadies, bare_secs, folded_secs, feats = [], [], [], None
            folding = paired and self.cfg.fold_batchnorm and self.folds() > 0
            if paired:
                n_pass, one_pass = self.bare_pass()
                folded_pass = self.bare_pass(folded=True)[1] if folding else None
                for _ in range(max(self.cfg.warmup, 1)):
                    feats = one_pass()
                    if folding:
                        folded_pass()
            for k in range(self.cfg.warmup + self.cfg.repeats):
                if paired and k >= self.cfg.warmup:
                    t0 = time.perf_counter()
                    feats = one_pass()
                    bare_secs.append(time.perf_counter() - t0)
                    if folding:
                        t0 = time.perf_counter()
                        folded_pass()
                        folded_secs.append(time.perf_counter() - t0)
                total, ext, plan_s, path, fcfg, steady = one(k)
                if k >= self.cfg.warmup:
                    totals.append(total), extracts.append(ext), plans.append(plan_s), paths.append((path, fcfg))
                    if steady:
                        steadies.append(steady)
            self.cache["e2e"] = (totals, extracts, plans, paths)
            self.cache["steady"] = steadies
            if paired:
                self.cache["bare"] = (n_pass, bare_secs, feats)
            if folding:
                self.cache["bare_folded"] = folded_secs
        return self.cache["e2e"]
