"""``sweep BACKBONES=a,b,a+b``: the backbone leaderboard. Every backbone (or ensemble, ``name[@size]+...``) is
swept over HEADS as the sweep does one cache (:mod:`pipeline.heads.sweep`); each (backbone, head) with its
best CV parameters is also fitted on train and scored on val and test. One table (printed, CSV, JSON and an
HTML page under ``<REPORTS_DIR>/leaderboard/<data>/``); the best (backbone, head) by CV score refitted on
train+val and saved as the sweep saves its best. Missing caches are made first (the features step, with its
progress), each member once."""

from __future__ import annotations

import csv
import glob
import os
import time

import numpy as np

from pipeline import records
from pipeline.cache import ensemble, resolve, store
from pipeline.configs import SCORINGS, HeadConfig, replace
from pipeline.errors import PipelineError
from pipeline.heads import registry, sweep
from pipeline.heads.train import check_outputs, check_splits, finish, fit, views_of
from pipeline.reports import html
from pipeline.tables import table

COLUMNS = ("rank", "backbone", "head", "cv mean", "cv std", "val acc", "test acc", "dim", "extract ms/img",
           "fit s", "params")


def backbone_names(text: str) -> list[str]:
    """The BACKBONES entries, each checked (an unknown name or bad ensemble syntax is one line)."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    if not names:
        raise PipelineError(f"BACKBONES={text!r}: give a comma list, e.g. efficientnet_lite0,efficientnet_lite2,"
                            "efficientnet_lite0+efficientnet_lite2")
    for b in names:
        ensemble.parse(b)
    if len(set(names)) != len(names):
        raise PipelineError(f"BACKBONES={text}: a backbone is named twice")
    return names


def member_caches(cfg: HeadConfig, names: list[str], log=print) -> dict:
    """{(backbone, size): (cache path, extraction seconds per image or None)} of every member of every
    entry, each resolved once (made when missing). The cache file records no extraction time: the cost is
    known only for a cache made here (its whole features run over its rows), else None."""
    todo = list(dict.fromkeys(m for b in names for m in ensemble.parse(b)))
    out = {}
    for i, (name, size) in enumerate(todo, 1):
        log(f"leaderboard: cache {i} of {len(todo)}: {name}" + (f"@{size}" if size else ""))
        before = set(glob.glob(os.path.join(glob.escape(cfg.cache_dir), "*.h5")))
        t0 = time.perf_counter()
        path = resolve.resolve_cache(replace(cfg, backbone=name, size=size or cfg.size), log)
        secs = time.perf_counter() - t0
        rows = None
        if path not in before:
            with store.open_file(path, "r") as f:
                rows = sum(f[s]["labels"].shape[0] for s in f)
        out[(name, size)] = (path, secs / rows if rows else None)
    return out


def load(entry: str, cfg: HeadConfig, members: dict):
    """The cache of one BACKBONES entry (an ensemble's members joined by image content) and its extraction
    cost per image (the members' summed; None when one is unknown)."""
    parts = ensemble.parse(entry)
    if len(parts) > 1:
        ensemble.member_configs(replace(cfg, backbone=entry))  # VIEWS and TTA refused for an ensemble
    costs = [members[m][1] for m in parts]
    cost = None if any(c is None for c in costs) else float(sum(costs))
    paths = [members[m][0] for m in parts]
    return (ensemble.join(paths, entry) if len(parts) > 1 else store.load(paths[0])), cost


def rank_backbone(entry, cache, cfg, names, fixed, cost, log=print) -> list[dict]:
    """One backbone's rows: each head's CV search (:func:`sweep.search_head`), then its best parameters
    fitted on train (the dense head early-stopping on val) and scored on val and test."""
    check_splits(cache)
    X, y, folds, views = sweep.cv_data(cache, cfg, log)
    log(f"{entry}: {cfg.cv}-fold CV of {', '.join(names)} on train+val ({len(y)} x {X.shape[1]})")
    board = [r for r in sweep.overlapped(lambda n: sweep.search_head(n, cfg, fixed[n], X, y, folds, log),
                                         names, cfg.jobs) if r is not None]
    tr, va, te = (cache.splits[s] for s in ("train", "val", "test"))
    rows = []
    for r in board:
        head = registry.get(r["head"])
        est = head.build(head.resolve(r["params"]), seed=cfg.head_seed)
        secs = fit(r["head"], est, tr.features, tr.labels, (va.features, va.labels), views_of(cache, cfg))
        rows.append({"backbone": entry, "head": r["head"], "params": r["params"], "cv_mean": r["mean"],
                     "cv_std": r["std"], "val": float(np.mean(est.predict(va.features) == va.labels)),
                     "test": float(np.mean(est.predict(te.features) == te.labels)), "dim": int(X.shape[1]),
                     "extract_ms_per_image": None if cost is None else 1000 * cost, "fit_seconds": secs,
                     "search_seconds": r["seconds"], "cache": cache.path})
    return rows


def cells(i, r) -> list:
    ms = r["extract_ms_per_image"]
    return [i, r["backbone"], r["head"], f"{r['cv_mean']:.4f}", f"{r['cv_std']:.4f}", f"{r['val']:.4f}",
            f"{r['test']:.4f}", r["dim"], "-" if ms is None else f"{ms:.1f}", f"{r['fit_seconds']:.2f}",
            registry.get(r["head"]).describe(r["params"])]


def write(out_dir, rows, cfg, best_line) -> dict:
    """leaderboard.json, .csv and index.html in ``out_dir``; their paths."""
    paths = {k: os.path.join(out_dir, f"leaderboard.{k}") for k in ("json", "csv")}
    paths["html"] = os.path.join(out_dir, "index.html")
    records.write_json(paths["json"], {"scoring": cfg.scoring, "cv": cfg.cv, "seed": cfg.head_seed,
                                       "data": cfg.data, "best": best_line, "leaderboard": rows})
    with records.atomic_path(paths["csv"]) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([c.replace(" ", "_").replace("/", "_per_") for c in COLUMNS])
            w.writerows(cells(i, r) for i, r in enumerate(rows, 1))
    page = html.Page(f"Backbone leaderboard: {os.path.basename(cfg.data.rstrip('/')) or cfg.data}",
                     f"{cfg.cv}-fold CV {cfg.scoring} on train+val (mean and std over folds) of each head's best "
                     "parameters; val and test accuracy of the same head fitted on train; extraction cost per "
                     "image only for caches made in this run ('-': the cache records no extraction time).")
    page.section("Backbones x heads").table(COLUMNS, [cells(i, r) for i, r in enumerate(rows, 1)])
    page.section("Best").text(best_line)
    page.write(paths["html"])
    return paths


def run(cfg: HeadConfig, extra: dict | None = None, log=print) -> dict:
    """The leaderboard of BACKBONES x HEADS (see the module's doc); returns {"rows", "best", "paths"}."""
    if cfg.cache:
        raise PipelineError("BACKBONES and CACHE: give one (BACKBONES makes or finds each backbone's cache)")
    if cfg.scoring not in SCORINGS:
        raise PipelineError(f"unknown scoring {cfg.scoring!r}; valid: {', '.join(SCORINGS)}")
    entries = backbone_names(cfg.backbones)
    names = sweep.sweep_names(cfg.heads)
    fixed = sweep.fixed_params(names, extra)
    check_outputs(cfg)
    t0 = time.perf_counter()
    members = member_caches(cfg, entries, log)
    caches, rows = {}, []
    for entry in entries:
        caches[entry], cost = load(entry, cfg, members)
        rows += rank_backbone(entry, caches[entry], cfg, names, fixed, cost, log)
    if not rows:
        raise PipelineError("leaderboard: no head could be fitted on these caches")
    rows.sort(key=lambda r: -r["cv_mean"])
    log(table(COLUMNS, [cells(i, r) for i, r in enumerate(rows, 1)], align="<<<>>>>>>><"))
    win = rows[0]
    best_line = (f"best: {win['backbone']} + {win['head']} {registry.get(win['head']).describe(win['params'])} "
                 f"(cv {cfg.scoring} {win['cv_mean']:.4f} ± {win['cv_std']:.4f})")
    out_dir = os.path.join(cfg.reports_dir, "leaderboard", os.path.basename(cfg.data.rstrip("/")) or "data")
    paths = write(out_dir, rows, cfg, best_line)
    log(f"{best_line}; refitting on train+val")
    paths.update(save_best(win, caches[win["backbone"]], replace(cfg, backbone=win["backbone"]), paths, log))
    log(f"leaderboard in {paths['csv']}, .json and {paths['html']} ({time.perf_counter() - t0:.0f} s)")
    return {"rows": rows, "best": win, "paths": paths}


def save_best(win, cache, cfg, paths, log) -> dict:
    """The winner refitted on train+val (and the train views), reported on test, saved as the sweep's best."""
    head = registry.get(win["head"])
    params = head.resolve(win["params"])
    est = head.build(params, seed=cfg.head_seed)
    X, y, _, _ = sweep.cv_data(cache, cfg)
    secs = fit(win["head"], est, X, y)
    return finish(est, cache, cfg, "best", win["head"], params,
                  {"fit_seconds": secs, "cv_score": win["cv_mean"], "cv_std": win["cv_std"], "scoring": cfg.scoring,
                   "trained_on": "train+val", "backbone": win["backbone"], "leaderboard": paths["json"]},
                  log, on_val=False)


def step(cfg: HeadConfig, extra: dict | None = None) -> None:
    """The ``sweep`` step: with BACKBONES the leaderboard, else the sweep of one cache."""
    if cfg.backbones:
        run(cfg, extra)
    else:
        sweep.step(cfg, extra)
