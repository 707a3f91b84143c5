"""``quality``: test accuracy of the best of QUALITY_HEADS (chosen on val) on each QUALITY backbone, of
fine-tuning (FINETUNE=1), and of two baselines: raw pixels and BACKBONE with random weights."""

from __future__ import annotations

import glob
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.memo import NAME as MEMO
from pipeline.bench.common import entry_label, features_args, features_config, quiet, run_child
from pipeline.configs import FinetuneConfig, fields
from pipeline.data import sources
from pipeline.data.loading import cores
from pipeline.errors import PipelineError


def run(ctx):
    from pipeline.cache import extract as features
    from pipeline.cache import store
    from pipeline.heads import registry as heads

    cfg = ctx.cfg
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


def _finetune_run(ctx, label, folder, extra) -> dict:
    cfg = ctx.cfg
    row = {"label": label, "args": " ".join((extra + " " + cfg.finetune_args).split())}
    args = features_args(features_config(cfg))
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
