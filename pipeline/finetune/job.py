"""Preparing a fine-tune: the cache (extracted when missing), the dense head (trained on the cache when
missing), the end-to-end model on the same backbone, unfrozen and compiled."""

from __future__ import annotations

import os
from dataclasses import dataclass

import keras

from pipeline import records
from pipeline.cache import extract, resolve, store
from pipeline.cache.plan import Plan
from pipeline.configs import FLIPS, MONITORS, OPTIMIZERS, FeaturesConfig, FinetuneConfig, HeadConfig, fields, narrow
from pipeline.data import loading, sources
from pipeline.errors import PipelineError, choose
from pipeline.finetune.model import augmentation, build_model, check_options, compile_model, find_base
from pipeline.finetune.unfreeze import (
    Unfreeze,
    apply_unfreeze,
    first_trainable,
    format_table,
    parameter_table,
    parse_unfreeze,
)
from pipeline.heads import artifacts, registry
from pipeline.heads import train as head_train

HEAD_NAME = "dense"  # the record of ``make head HEAD=dense`` is the head put on top
NAME = "finetune"  # models/<stem>/finetune-<sha12>.keras + finetune.json, reports/<stem>/finetune/

@dataclass
class Job:
    """Everything a fine-tune needs, resolved from the config; ``model`` is built, unfrozen and compiled."""

    cfg: FinetuneConfig
    plan: object  # cache.plan.Plan: dataset, split, backbone, key
    cache: store.Cache
    head: object  # heads.dense.DenseHead
    head_record: dict
    head_record_path: str
    base: object
    model: object
    policy: Unfreeze
    unfreeze: dict
    parameters: list
    log: callable = print
    call: object = None  # the compiled inference call, made once


    @property
    def size(self):
        return self.plan.size

    def split(self, name):
        return self.plan.ds.split(name)

    def images(self, split, labels=False, shuffle=False):
        """Batches of the split's raw pixels, decoded as for the cache (same size and interpolation)."""
        return loading.dataset(self.plan.ds, self.split(split), self.size, self.plan.cfg.interpolation,
                             self.cfg.batch, labels=labels, shuffle_seed=self.cfg.head_seed if shuffle else None)


def _features_config(cfg: FinetuneConfig, cache: store.Cache | None) -> FeaturesConfig:
    """The features options: the config's, or with ``CACHE`` those recorded in the cache file."""
    if cache is None:
        return narrow(cfg, FeaturesConfig)
    rec = cache.config
    if "data" not in rec or "backbone" not in rec:
        raise PipelineError(f"{cache.path}: its record has no features options; fine-tuning needs the images: "
                            "make the cache with make features")
    defaults = FeaturesConfig()  # options added since the cache was made: their defaults, as it was made with
    values = {n: rec.get(n, getattr(defaults, n)) for n in fields(FeaturesConfig)}
    if values["data"] not in sources.BUILTIN and rec.get("source_root"):
        values["data"] = rec["source_root"]
    return FeaturesConfig(**values)


def _check_options(cfg: FinetuneConfig) -> Unfreeze:
    if cfg.precision != "float32":
        raise PipelineError(f"PRECISION={cfg.precision}: fine-tuning trains in float32 from a float32 cache; "
                            "drop PRECISION (mixed-precision training is not supported)")
    if cfg.head != HEAD_NAME:
        raise PipelineError(f"HEAD={cfg.head}: fine-tuning puts a Keras dense head on the backbone; "
                            f"valid: {HEAD_NAME}")
    choose(cfg.optimizer, dict.fromkeys(OPTIMIZERS), "optimizer")
    choose(cfg.finetune_monitor, dict.fromkeys(MONITORS), "FINETUNE_MONITOR")
    choose(cfg.flip, dict.fromkeys(FLIPS), "flip mode")
    if cfg.finetune_epochs < 0 or cfg.finetune_patience < 0:
        raise PipelineError("FINETUNE_EPOCHS and FINETUNE_PATIENCE must be 0 or more")
    if not cfg.finetune_lr > 0:
        raise PipelineError(f"FINETUNE_LR={cfg.finetune_lr}: must be positive")
    if cfg.verbose not in (0, 1, 2):
        raise PipelineError(f"VERBOSE={cfg.verbose}: valid: 0, 1, 2")
    check_options(cfg.schedule, cfg.warmup, cfg.weight_decay, cfg.label_smoothing)  # before any work
    return parse_unfreeze(cfg.unfreeze)


def _resolve_cache(cfg, plan, log):
    extract.report_duplicates(plan)
    if plan.up_to_date():
        log(f"up to date: {plan.path}")
        extract.report_skipped(plan)
        return plan.path
    served = plan.serve()  # VIEWS=K: a cache of this configuration with more views serves it
    if served is not None:
        return served
    if not cfg.extract:
        raise PipelineError(f"no feature cache for this configuration ({plan.path}); make it with: "
                            f"{resolve.features_command(plan.cfg)}")
    path = extract.ensure(plan)
    extract.report_skipped(plan)
    return path


def dense_head(cfg: FinetuneConfig, extra: dict | None, cache: store.Cache, log=print):
    """(estimator, record, record path) of the dense head trained on ``cache`` with the hyper-parameters in
    ``extra`` over the defaults: the saved one when it matches, else trained now (as ``make head``)."""
    spec = registry.get(HEAD_NAME)
    params = spec.resolve(extra)
    wanted = {k: artifacts.jsonable(v) for k, v in params.items()}
    path = artifacts.record_path(cfg.models_dir, cache.path, HEAD_NAME)
    reason = "none saved for this cache"
    if os.path.exists(path):
        rec = records.read_json(path)
        if rec.get("params") != wanted:
            reason = "the saved one has other hyper-parameters"
        elif (rec.get("config") or {}).get("head_seed") != cfg.head_seed:
            reason = "the saved one has another HEAD_SEED"
        elif (rec.get("metrics") or {}).get("views", 0) != head_train.views_used(cache, cfg):
            reason = "the saved one trained on another number of views"
        else:
            try:
                est, rec = artifacts.load(path, expect_key=cache.key)
            except PipelineError as e:  # changed file, other versions: it costs seconds to remake
                reason = f"the saved one cannot be used: {e}"
            else:
                val = (rec.get("metrics") or {}).get("val", {}).get("accuracy", float("nan"))
                log(f"phase 1: dense head {spec.describe(params)} from {path} (val accuracy {val:.4f} on the cache)")
                return est, rec, path
    log(f"phase 1: training the dense head on the cache ({reason})")
    hcfg = HeadConfig(**{**{n: getattr(cfg, n) for n in fields(HeadConfig)}, "head": HEAD_NAME,
                         "cache": cache.path})
    paths = head_train.train_head(cache, hcfg, HEAD_NAME, params, log=log)
    est, rec = artifacts.load(paths["record"], expect_key=cache.key)
    return est, rec, paths["record"]


def prepare(cfg: FinetuneConfig, extra: dict | None = None, log=print) -> Job:
    """Resolve the cache (extracting it when missing), get the dense head (training it when missing), build
    the end-to-end model on the same backbone, apply the unfreeze policy, compile. Nothing is fitted."""
    policy = _check_options(cfg)
    head_train.check_outputs(cfg)
    registry.get(HEAD_NAME).resolve(extra)  # bad head hyper-parameters fail before any work
    given = store.load(cfg.cache) if cfg.cache else None
    plan = Plan(_features_config(cfg, given), log=log)
    base = find_base(plan.model)
    first_trainable(base, plan.spec, policy)  # an unknown layer name fails before extraction or training
    if given is not None:
        if given.key != plan.key:
            raise PipelineError(f"CACHE={cfg.cache}: its images, backbone or weights have changed since it was "
                                f"made (key {given.key[:12]}, now {plan.key[:12]}); rerun make features")
        path = cfg.cache
    else:
        path = _resolve_cache(cfg, plan, log)
    cache = store.load(path, expect_key=plan.key if path == plan.path else None)  # else served: more views
    head_train.check_splits(cache)
    est, head_rec, head_path = dense_head(cfg, extra, cache, log)
    if est.model_.input_shape[-1] != plan.dim:
        raise PipelineError(f"{head_path}: takes {est.model_.input_shape[-1]} features, the backbone gives "
                            f"{plan.dim}; retrain it with make head HEAD=dense")
    keras.utils.set_random_seed(cfg.head_seed)
    augment = augmentation(cfg.flip, cfg.rotation, cfg.zoom, cfg.contrast, seed=cfg.head_seed)
    model = build_model(plan.spec, plan.size, base, plan.cfg.pooling, est.model_, augment,
                        gem_p=plan.cfg.gem_p)
    table = parameter_table(model, base, plan.spec, policy)
    info = apply_unfreeze(base, plan.spec, policy)
    compile_model(model, cfg.optimizer, cfg.finetune_lr, cfg.momentum)
    alpha = plan.cfg.alpha or plan.spec.alpha
    log(format_table(table, f"parameters of {plan.spec.name}{f' (alpha {alpha})' if alpha else ''} "
                            f"@{plan.size} + dense head:"))
    return Job(cfg, plan, cache, est, head_rec, head_path, base, model, policy, info, table, log)
