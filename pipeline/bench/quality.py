"""``quality``: test accuracy of the best of QUALITY_HEADS (chosen on val) on each QUALITY backbone, of
fine-tuning (FINETUNE=1), and of two baselines: raw pixels and BACKBONE with random weights. With SEEDS
(split seeds) instead: mean and spread over the seeds of the best single backbone's logreg and dense heads,
the best ensemble of QUALITY backbones, each of POOLINGS on BACKBONE and (FINETUNE=1) the fine-tune with
its defaults against its own cached dense head. What it measures with is imported lazily, where it measures."""

from __future__ import annotations

import glob
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import numpy as np

from pipeline.memo import NAME as MEMO
from pipeline.bench.common import entry_label, features_args, features_config, quiet, run_child, seed_list
from pipeline.configs import FinetuneConfig, fields
from pipeline.data import sources
from pipeline.data.loading import cores
from pipeline.errors import PipelineError

SEED_HEADS = ("logreg", "dense")


def check(cfg) -> None:
    """SEEDS and POOLINGS: one line before any work."""
    from pipeline.backbones.registry import POOLINGS

    if cfg.seeds:
        seed_list(cfg.seeds)
        for p in (p.strip() for p in cfg.poolings.split(",")):
            if p not in POOLINGS:
                raise PipelineError(f"POOLINGS={cfg.poolings!r}: unknown {p!r}; valid: {', '.join(POOLINGS)}")


def run(ctx):
    from pipeline.cache import extract as features
    from pipeline.cache import store
    from pipeline.heads import registry as heads

    cfg = ctx.cfg
    if cfg.seeds:
        return _over_seeds(ctx)
    names = [h.strip() for h in cfg.quality_heads.split(",") if h.strip()]
    for n in names:
        heads.get(n)
    entries = [(entry_label(b, a, w), features_config(cfg, backbone=b, alpha=a, weights=w)) for b, a, w in ctx.quality]
    entries.append((f"{cfg.backbone} random weights (baseline)", features_config(cfg, weights="none")))
    rows, m, show = [], {}, []
    for label, fcfg in entries:
        row = {"label": label, "backbone": fcfg.backbone, "alpha": fcfg.alpha, "weights": fcfg.weights}
        try:
            before = set(glob.glob(os.path.join(glob.escape(fcfg.cache_dir), "*.h5")))
            t0 = time.perf_counter()
            with quiet():
                path = features.run(fcfg, log=lambda s: None)
            secs = time.perf_counter() - t0
            cache = store.load(path)
            row.update(_fit_heads(ctx, cache, names), dim=int(cache.splits["train"].features.shape[1]),
                       images=sum(len(sp.labels) for sp in cache.splits.values()))
            if path not in before:  # made here: its whole features run, scan and build included
                row["features_seconds"] = secs
        except PipelineError as e:
            row["error"] = str(e)
            ctx.log(f"quality: {label}: {e}")
        rows.append(row)
    rows.append(_raw_pixels(ctx, names))
    if cfg.finetune:
        rows += _finetune(ctx)
    for i, row in enumerate(rows):
        key = f"q{i}"
        if "test" in row:
            more = f", {row['epochs']} epochs, {row['seconds']:.0f} s whole" if "epochs" in row else ""
            if "dim" in row:  # the feature size; and the extraction rate of a cache made here (not found current)
                more += f", {row['dim']}-d" + (f", made at {row['images'] / row['features_seconds']:.0f} img/s"
                                               if "features_seconds" in row else "")
            m[key] = (row["test"], f"test acc ({row['best']}){more}")
            m[key + "_val"] = row["val"]
        else:
            m[key] = (row.get("error", "not run")[:60], "")
        show.append((row["label"], key))
    split = rows[0].get("counts", {})
    return {"metrics": m, "rows": rows, "show": show,
            "note": f"DATA={cfg.data}, size {ctx.size if cfg.size == 0 else cfg.size}; heads "
                    f"{', '.join(names)} fitted on train with their defaults, the best on val reported "
                    f"on test; split sizes {split}"}


def _fit_heads(ctx, cache, names):
    from pipeline.heads.train import check_splits

    check_splits(cache)
    return _best_head({s: (sp.features, sp.labels) for s, sp in cache.splits.items()}, names, ctx.cfg.seed)


def _raw_pixels(ctx, names):
    cfg = ctx.cfg
    row = {"label": f"raw pixels {cfg.raw_size}x{cfg.raw_size} (baseline)"}
    try:
        ds = sources.open_source(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.per_class,
                              cfg.max_pixels, os.path.join(cfg.cache_dir, MEMO), progress=False)
        with ThreadPoolExecutor(cores()) as pool:
            x = np.stack(list(pool.map(lambda i: ds.load(i, cfg.raw_size, cfg.interpolation),
                                       range(len(ds.items)))))
        x = x.reshape(len(x), -1).astype(np.float32) / 255.0
        y = np.asarray([it.label for it in ds.items], np.int32)
        splits = {s: (x[ds.split(s)], y[ds.split(s)]) for s in ds.splits()}
        row.update(_best_head(splits, ["logreg"], cfg.seed))
    except PipelineError as e:
        row["error"] = str(e)
    return row


def _finetune(ctx) -> list[dict]:
    """Fine-tuning through the ``finetune`` step, run as a whole command once per FINETUNE_COMPARE entry
    (``label: NAME=value ...``; FINETUNE_ARGS added to each): test accuracy, epochs, wall time; and first the
    cached dense head every run started from."""
    cfg = ctx.cfg
    runs = [(p.partition(":")[0], p.partition(":")[2]) for p in map(str.strip, cfg.finetune_compare.split(";")) if p]
    rows, start = [], None
    for i, (name, extra) in enumerate(runs):
        row = _finetune_run(ctx, f"fine-tuned {cfg.backbone}: {name.strip()}", f"finetune{i}", extra)
        start = start or row.pop("head_only", None)
        row.pop("head_only", None)
        rows.append(row)
    if start:
        rows.insert(0, {"label": f"cached dense head of {cfg.backbone} (fine-tuning's start)", "best": "dense",
                        "test": start["test"], "val": start["val"],
                        "heads": [{"head": "dense", **start}]})
    return rows


def _finetune_run(ctx, label, folder, extra, seed=None) -> dict:
    cfg = ctx.cfg
    row = {"label": label, "args": " ".join((extra + " " + cfg.finetune_args).split())}
    args = features_args(features_config(cfg, **({} if seed is None else {"seed": seed})))
    out_dir = os.path.join(ctx.work, folder)
    args += [f"MODELS_DIR={os.path.join(out_dir, 'models')}", f"REPORTS_DIR={os.path.join(out_dir, 'reports')}"]
    own = {f.upper() for f in fields(FinetuneConfig)}
    args = [a for a in args if a.split("=", 1)[0] in own] + extra.split() + cfg.finetune_args.split()
    try:
        t0 = time.perf_counter()
        run_child(["finetune", *args], os.path.join(ctx.work, folder + ".log"))
        row["seconds"] = time.perf_counter() - t0
    except PipelineError as e:
        row["error"] = str(e)[:200]
        return row
    found = glob.glob(os.path.join(out_dir, "reports", "*", "finetune", "metrics.json"))
    try:
        with open(found[0]) as f:
            m = json.load(f)
        acc, val = m["test"]["accuracy"], m["val"]["accuracy"]
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        row["error"] = f"the finetune step wrote no test accuracy under {out_dir}/reports"
        return row
    ho = m.get("head_only") or {}
    row.update(test=float(acc), val=float(val), best="finetune", epochs=m.get("epochs"),
               best_epoch=m.get("best_epoch"), fit_seconds=m.get("fit_seconds"),
               heads=[{"head": "finetune", "val": val, "test": acc}], report=found[0])
    if "test" in ho and "val" in ho:
        row["head_only"] = {"val": float(ho["val"]["accuracy"]), "test": float(ho["test"]["accuracy"])}
        row["gain_points"] = 100 * (float(acc) - row["head_only"]["test"])
    return row

# -- the run

def _best_head(splits, names, seed) -> dict:
    """Each head fitted on train with its defaults; the best on val; its test accuracy."""
    from pipeline.heads import registry as heads
    from pipeline.heads.dense import DenseHead

    (xt, yt), (xv, yv), (xs, ys) = splits["train"], splits["val"], splits["test"]
    out = []
    for name in names:
        est = heads.build(name, seed=seed)
        with quiet():
            if isinstance(est, DenseHead):
                est.fit(xt, yt, validation_data=(xv, yv))
            else:
                est.fit(xt, yt)
        out.append({"head": name, "val": float(np.mean(est.predict(xv) == yv)),
                    "test": float(np.mean(est.predict(xs) == ys))})
    best = max(out, key=lambda h: h["val"])  # first of equals, in the order given
    return {"best": best["head"], "val": best["val"], "test": best["test"], "heads": out,
            "counts": {s: int(len(y)) for s, (_, y) in splits.items()}}


# -- over split seeds

def _over_seeds(ctx) -> dict:
    """Every QUALITY backbone, every ensemble of two or more of them, BACKBONE with each of POOLINGS, the
    heads of SEED_HEADS fitted on train, on each split seed; the summary rows picked by mean val accuracy."""
    from pipeline.cache import ensemble, store

    cfg, seeds = ctx.cfg, seed_list(ctx.cfg.seeds)
    singles = [(entry_label(b, a, w), {"backbone": b, "alpha": a, "weights": w}) for b, a, w in ctx.quality]
    pools = [(f"{cfg.backbone} POOLING={p}", {"pooling": p}) for p in map(str.strip, cfg.poolings.split(","))]
    scores = {}  # features label -> head -> {"val": [...], "test": [...]} in the order of seeds
    for seed in seeds:
        paths = {}
        for label, changes in singles + pools:
            paths[label] = _seed_cache(ctx, features_config(cfg, seed=seed, **changes))
            _score(scores, label, store.load(paths[label]))
        for k in range(2, len(singles) + 1):
            for combo in combinations([label for label, _ in singles], k):
                joined = ensemble.join([paths[label] for label in combo], "+".join(combo))
                _score(scores, " + ".join(combo), joined)
    summary = [_pick("best single backbone, logreg", scores, [s for s, _ in singles], ["logreg"]),
               _pick("best single backbone, dense", scores, [s for s, _ in singles], ["dense"]),
               _pick("best single backbone", scores, [s for s, _ in singles], SEED_HEADS)]
    ens = [f for f in scores if f.count(" + ")]
    if ens:
        summary.append(_pick("best ensemble", scores, ens, SEED_HEADS))
    summary += [_pick(f"{label}, {h}", scores, [label], [h]) for label, _ in pools for h in SEED_HEADS]
    if cfg.finetune:
        summary += _finetune_seeds(ctx, seeds)
    rows = [{"label": f, "heads": [{"head": h, "val": float(np.mean(v["val"])), "test": float(np.mean(v["test"]))}
                                   for h, v in hs.items()]} for f, hs in scores.items()]
    m = {f"s{i}": (r["test_mean"], f"test acc mean over seeds {cfg.seeds}, spread {r['test_spread']:.4f} "
                                   f"(max-min); {r['picked']}") if "error" not in r else (r["error"][:60], "")
         for i, r in enumerate(summary)}
    return {"metrics": m, "rows": rows, "summary": summary, "seeds": seeds,
            "show": [(r["label"], f"s{i}") for i, r in enumerate(summary)], "verdicts": _verdicts(summary),
            "note": f"DATA={cfg.data}; split seeds {cfg.seeds}; heads {', '.join(SEED_HEADS)} fitted on train with "
                    "their defaults (dense early-stops on val); each row picked by mean val accuracy, reported on "
                    "test as mean and spread (max-min) over the seeds"}


def _seed_cache(ctx, fcfg) -> str:
    from pipeline.cache import extract as features

    with quiet():
        return features.run(fcfg, log=lambda s: None)


def _score(scores, label, cache) -> None:
    from pipeline.heads.train import check_splits

    check_splits(cache)
    fitted = _best_head({s: (sp.features, sp.labels) for s, sp in cache.splits.items()}, SEED_HEADS, 0)
    for h in fitted["heads"]:
        got = scores.setdefault(label, {}).setdefault(h["head"], {"val": [], "test": []})
        got["val"].append(h["val"])
        got["test"].append(h["test"])


def _stats(label, picked, test, val=None) -> dict:
    row = {"label": label, "picked": picked, "test": [float(t) for t in test], "test_mean": float(np.mean(test)),
           "test_spread": float(np.ptp(test))}
    if val is not None:
        row.update(val=[float(v) for v in val], val_mean=float(np.mean(val)))
    return row


def _pick(label, scores, features, heads) -> dict:
    """The (features, head) of the best mean val accuracy (first of equals) with its test accuracies."""
    f, h = max(((f, h) for f in features for h in heads if h in scores.get(f, {})),
               key=lambda fh: np.mean(scores[fh[0]][fh[1]]["val"]))
    return _stats(label, f"{f}, {h}", scores[f][h]["test"], scores[f][h]["val"])


def _finetune_seeds(ctx, seeds) -> list[dict]:
    """The fine-tune with its defaults on each seed and the cached dense head it started from."""
    runs = [_finetune_run(ctx, f"seed {s}", f"finetune-seed{s}", "", seed=s) for s in seeds]
    bad = [r.get("error", "no head-only accuracy reported") for r in runs if "error" in r or "head_only" not in r]
    if bad:
        return [{"label": f"fine-tuned {ctx.cfg.backbone} (defaults)", "error": bad[0][:200]}]
    gains = [r["gain_points"] for r in runs]
    return [_stats(f"cached dense head of {ctx.cfg.backbone} (fine-tune's start)", "dense",
                   [r["head_only"]["test"] for r in runs]),
            {**_stats(f"fine-tuned {ctx.cfg.backbone} (defaults)", "finetune", [r["test"] for r in runs]),
             "gain_points": gains, "epochs": [r.get("epochs") for r in runs]}]


def _verdicts(summary) -> list:
    by = {r["label"]: r for r in summary if "test_mean" in r}
    out = []
    if "best ensemble" in by:
        gain = 100 * (by["best ensemble"]["test_mean"] - by["best single backbone"]["test_mean"])
        out.append(("ensemble gain", f"{gain:+.2f} points over the best single backbone picked on val (mean; goal "
                                     f"+1.5 {'met' if gain >= 1.5 else 'NOT met'})"))
    tuned = next((r for r in summary if "gain_points" in r), None)
    if tuned:
        gains = tuned["gain_points"]
        out.append(("fine-tune gain", "points over its cached dense head per seed: " + ", ".join(
            f"{g:+.2f}" for g in gains) + f" (goal +1.5 on every seed {'met' if min(gains) >= 1.5 else 'NOT met'})"))
    return out
