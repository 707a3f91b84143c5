"""Each audit section on the page: runs its checks (the section modules), writes its CSV and fills its part
of the page; returns its summary for ``summary.json``. A check that cannot run raises :class:`Skipped`."""

from __future__ import annotations

import csv
import os

import numpy as np

from pipeline import records
from pipeline.reports.audit import Skipped, balance, labels, leaks, outliers, plots


def write_csv(path, columns, rows) -> None:
    """``rows`` (dicts) as CSV with ``columns``; floats with 6 decimals, lists joined by ' | '."""
    def text(v):
        return f"{v:.6f}" if isinstance(v, float) else " | ".join(map(str, v)) if isinstance(v, list) else v

    with records.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows([text(r[c]) for c in columns] for r in rows)


def label_issues(ctx, sec) -> dict:
    X, y, paths, splits = ctx.rows(("train", "val"))
    if not len(y):
        raise Skipped("no train or val images")
    found = labels.find(X, y, ctx.names, paths, splits, ctx.cfg.folds, ctx.cfg.head_seed)
    rows = found["rows"]
    path = os.path.join(ctx.out, "label_issues.csv")
    write_csv(path, labels.COLUMNS, rows)
    sec.text(f"{len(rows)} of {len(y)} train+val images may be mislabelled: the lowest label quality, as many as "
             "cleanlab's confident learning estimates, on out-of-fold probabilities (a logistic regression in "
             f"{ctx.cfg.folds} stratified folds and a nearest-neighbour vote). Lowest label quality first; each "
             "caption reads given -> suggested (quality). Full list: label_issues.csv.")
    top = rows[:ctx.cfg.show]
    sec.gallery([(ctx.thumb(r["path"]), f"{r['given']} -> {r['suggested']} ({r['quality']:.2f}) {r['path']}")
                 for r in top])
    sec.table(("path", "split", "given", "suggested", "quality"),
              [(r["path"], r["split"], r["given"], r["suggested"], r["quality"]) for r in top])
    ctx.log(f"label issues: {len(rows)} of {len(y)} train+val images flagged ({path})")
    return {"flagged": len(rows), "images": int(len(y)), "csv": path}


def duplicates(ctx, sec) -> dict:
    paths = {s: sp.paths for s, sp in ctx.cache.splits.items() if s in leaks.SPLITS}
    try:
        hashes = leaks.stored_hashes(ctx.cache) or leaks.file_hashes(ctx.cache)
        groups = leaks.exact(hashes, paths)
    except Skipped as e:
        groups, why = None, str(e)
    out = {}
    if groups is None:
        sec.skipped(f"exact duplicates: {why}")
    else:
        out.update(exact_groups(ctx, sec, groups, hashes))
    out.update(near_pairs(ctx, sec, hashes if groups is not None else None))
    return out


def exact_groups(ctx, sec, groups, hashes) -> dict:
    across = [g for g in groups if g["across"]]
    path = os.path.join(ctx.out, "exact_duplicates.csv")
    write_csv(path, ("sha256", "splits", "paths"), groups)
    sec.text(f"Exact duplicates (same file content): {len(groups)} group(s), {len(across)} across splits. "
             "List: exact_duplicates.csv.")
    if across:
        sec.warn(f"{len(across)} image(s) stand in more than one split: a val/test copy of a train image "
                 "flatters the scores; keep one copy of each (a copy under two classes is also a label issue).")
    sec.table(("", "splits", "paths"), [(ctx.thumb(g["paths"][0]), ", ".join(g["splits"]),
                                             " | ".join(g["paths"])) for g in groups[:ctx.cfg.show]])
    ctx.log(f"exact duplicates: {len(groups)} group(s), {len(across)} across splits ({path})")
    return {"exact_groups": len(groups), "exact_across_splits": len(across), "exact_csv": path}


def near_pairs(ctx, sec, hashes) -> dict:
    cfg, train = ctx.cfg, ctx.split("train")
    if cfg.near_fraction <= 0:
        sec.skipped("near-duplicates: NEAR_FRACTION=0")
        return {"near": "off"}
    others = {s: sp for s in ("val", "test") if (sp := ctx.split(s)) is not None}
    if train is None or not others:
        sec.skipped("near-duplicates: needs a train split and a val or test split")
        return {"near": "skipped"}
    th = leaks.threshold(train.features, cfg.near_quantile, cfg.near_fraction)
    pairs = leaks.near(train, others, th["distance"])
    index = {s: dict(zip(map(str, ctx.cache.splits[s].paths), h)) for s, h in (hashes or {}).items()}
    for p in pairs:  # the same file content too: yes, no, or unknown (no hashes)
        p["exact"] = ("yes" if index[p["split"]].get(p["path"]) == index["train"].get(p["train_path"]) else "no") \
            if index else ""
    path = os.path.join(ctx.out, "near_duplicates.csv")
    write_csv(path, ("split", "path", "train_path", "distance", "exact"), pairs)
    sec.text(f"Near-duplicates across splits: {len(pairs)} val/test image(s) closer to a train image than "
             f"cosine distance {th['distance']:.4f} ({cfg.near_fraction:g} x the {cfg.near_quantile:g} quantile "
             f"of train images' nearest-train distances, {th['base']:.4f}; median {th['median']:.4f}). "
             "List: near_duplicates.csv.")
    sec.table(("val/test", "train", "split", "path", "train path", "distance", "exact copy"),
              [(ctx.thumb(p["path"]), ctx.thumb(p["train_path"]), p["split"], p["path"], p["train_path"],
                p["distance"], p["exact"]) for p in pairs[:ctx.cfg.show]])
    ctx.log(f"near-duplicates: {len(pairs)} val/test image(s) within cosine distance {th['distance']:.4f} of a "
            f"train image ({path})")
    return {"near": len(pairs), "near_distance": th["distance"], "near_csv": path}


def outlier_images(ctx, sec) -> dict:
    X, y, paths, splits = ctx.rows(("train", "val", "test"))
    ranked = outliers.rank(X, y, paths, splits, ctx.names, ctx.cfg.neighbours)
    path = os.path.join(ctx.out, "outliers.csv")
    write_csv(path, ("path", "split", "label", "score"), ranked)
    sec.text(f"Images far from every other image: mean cosine distance to their {ctx.cfg.neighbours} nearest "
             f"neighbours among all {len(y)} images, farthest first (median {np.median([r['score'] for r in ranked]):.3f}). "
             "Full ranking: outliers.csv.")
    top = ranked[:ctx.cfg.show]
    sec.gallery([(ctx.thumb(r["path"]), f"{r['label']} ({r['split']}) {r['score']:.3f} {r['path']}") for r in top])
    sec.table(("path", "split", "label", "distance"), [(r["path"], r["split"], r["label"], r["score"]) for r in top])
    ctx.log(f"outliers: ranked {len(ranked)} images ({path})")
    return {"images": len(ranked), "top": [r["path"] for r in top[:5]], "csv": path}


def class_balance(ctx, sec) -> dict:
    per = balance.counts(ctx.cache)
    per = {s: per[s] for s in leaks.SPLITS if s in per}
    sec.table(("class", *per, "total"), [(c, *(per[s][i] for s in per), sum(per[s][i] for s in per))
                                         for i, c in enumerate(ctx.names)])
    sec.figure(plots.balance(per, ctx.names), "images per class and split")
    warning = balance.warning(per, ctx.names)
    if warning:
        sec.warn(warning)
        ctx.log(f"class balance: {warning}")
    else:
        sec.text(f"Balanced enough: train's largest class holds at most {balance.RATIO:g}x its smallest.")
        ctx.log("class balance: ok")
    return {"counts": per, "warning": warning}
