"""Which cache a head, the sweep, the audit or the fine-tune works on: ``CACHE``, else the one of the features
options (made by the features step when missing or stale, or named in an error with ``EXTRACT=0``); with
``BACKBONE=a+b`` every member's cache, joined by image content."""

from __future__ import annotations

import os
import shlex

from pipeline.cache import ensemble, extract, lazy, store
from pipeline.configs import FeaturesConfig, HeadConfig, fields, narrow
from pipeline.errors import PipelineError


def features_config(cfg: HeadConfig) -> FeaturesConfig:
    return narrow(cfg, FeaturesConfig)


def features_command(fcfg: FeaturesConfig) -> str:
    """The ``make features`` command that makes the cache of ``fcfg``."""
    default = FeaturesConfig()
    args = [f"{n.upper()}={getattr(fcfg, n)}" for n in fields(FeaturesConfig)
            if getattr(fcfg, n) != getattr(default, n)]
    return " ".join(["make features"] + [shlex.quote(a) for a in args])


def resolve_cache(cfg: HeadConfig, log=print) -> str:
    """The cache file to train on: ``CACHE``, else the one of the features options — made by running
    ``features`` (a no-op when up to date), or, with ``EXTRACT=0``, an error naming the command."""
    if cfg.cache:
        if not os.path.exists(cfg.cache):
            raise PipelineError(f"{cfg.cache}: no such cache file; make it with make features")
        return cfg.cache
    fcfg = features_config(cfg)
    if cfg.extract:
        return extract.run(fcfg, log=log)
    plan = extract.Plan(fcfg, log=log, lazy=True)
    if plan.up_to_date():
        return plan.path
    served = plan.serve()  # VIEWS=K: a cache of this configuration with more views serves it
    if served is None:
        raise PipelineError(f"no feature cache for this configuration ({plan.path}); make it with: "
                            f"{features_command(fcfg)}")
    return served


def load_cache(cfg, log=print) -> store.Cache:
    """The cache a head (sweep, audit) works on, loaded: :func:`resolve_cache`'s file, or with
    ``BACKBONE=a+b`` every member's cache resolved on its own and joined (:mod:`pipeline.cache.ensemble`)."""
    if cfg.cache or not ensemble.is_ensemble(cfg.backbone):
        return store.load(resolve_cache(cfg, log), budget=lazy.parse_budget(cfg.memory_budget))
    members = ensemble.member_configs(cfg)
    paths = []
    for i, member in enumerate(members, 1):
        log(f"ensemble member {i} of {len(members)}: {member.backbone}" + (f"@{member.size}" if member.size else ""))
        paths.append(resolve_cache(member, log))
    cache = ensemble.join(paths, cfg.backbone)
    log(f"ensemble of {len(members)} caches joined by image content: {cache.config['feature_dim']} features "
        "(each member L2-normalised, then standardised)")
    return cache


def stem(cache_path: str) -> str:
    """The cache file's name without ``.h5``: models and reports of a cache live under this name."""
    return os.path.splitext(os.path.basename(cache_path))[0]
