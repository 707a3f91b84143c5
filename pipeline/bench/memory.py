"""``memory``: peak RSS of ``python -m pipeline features`` in a subprocess at N and MEMORY_FACTOR x N images."""

from __future__ import annotations

import os

from pipeline.bench.common import GOALS, Images, features_args, run_child
from pipeline.bench.report import stat


def run(ctx):
    cfg, out = ctx.cfg, {}
    sets = {"small": ctx.images(), "large": (ctx.images() if cfg.memory_factor == 1 else
                                              Images(cfg, ctx.work, cfg.n * cfg.memory_factor, "images-large",
                                                     ctx.log))}
    for name, imgs in sets.items():
        runs = []
        for k in range(max(cfg.memory_repeats, 1)):
            fcfg = imgs.fcfg(cfg, os.path.join(ctx.work, f"mem-{name}-{k}"))
            runs.append(run_child(["features", *features_args(fcfg)],
                                  os.path.join(ctx.work, f"mem-{name}-{k}.log")))
        out[name] = runs
        ctx.cache[f"mem-{name}"] = fcfg
    small, large = (stat([r["rss_mib"] for r in out[s]], "MiB") for s in ("small", "large"))
    ratio = large["median"] / small["median"]
    n_small, n_large = sets["small"].n, sets["large"].n
    return {"metrics": {"rss_small": small, "rss_large": large, "ratio": ratio,
                        "wall_small": stat([r["seconds"] for r in out["small"]], "s"),
                        "wall_large": stat([r["seconds"] for r in out["large"]], "s"),
                        "n_small": n_small, "n_large": n_large},
            "goal": GOALS["memory"], "met": ratio <= GOALS["memory"],
            "show": [(f"peak RSS, {n_small} images", "rss_small"), (f"peak RSS, {n_large} images", "rss_large"),
                     ("ratio large / small (goal <= 1.2)", "ratio"),
                     (f"wall, {n_small} images (whole command)", "wall_small"),
                     (f"wall, {n_large} images (whole command)", "wall_large")],
            "note": "python -m pipeline features in a subprocess into a fresh cache folder; peak RSS from "
                    "os.wait4 (ru_maxrss)"}
