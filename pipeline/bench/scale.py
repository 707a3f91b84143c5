"""``scale`` (only when named): synthetic caches of 10^4, 10^5 (and 10^6 with ``SCALE_MAX=1000000``) rows x 1,280
float16 with a known class structure, written through the cache writer; per size, each in a subprocess of its
own (wall time and peak RSS from ``os.wait4``): open + verify (cold), the logreg head's fit (in memory within
MEMORY_BUDGET, streamed past it), predict on the test split; the time ratio per 10x rows; a log-log plot.

``python -m pipeline.bench.scale open|fit|predict CACHE BUDGET`` is the measured child.

The heads and matplotlib are imported lazily, in the child processes and the plot that use them."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from pipeline.bench import synthetic
from pipeline.bench.common import run_command
from pipeline.bench.report import stat
from pipeline.cache import lazy, store
from pipeline.errors import PipelineError

DIM, CLASSES = 1280, 10
OPS = ("open", "fit", "predict")
GOAL = 12.0  # time ratio per 10x rows at most


def sizes(scale_max: int) -> list[int]:
    return [n for n in (10_000, 100_000, 1_000_000) if n <= scale_max]


def check(cfg) -> None:
    if not sizes(cfg.scale_max):
        raise PipelineError(f"SCALE_MAX={cfg.scale_max}: at least 10000 (the smallest size)")
    lazy.parse_budget(cfg.memory_budget)


def child(op: str, path: str, budget: str) -> dict:
    """One measured operation: ``open`` (load, verifying), ``fit`` (logreg: in memory or streamed; saved beside
    the cache), ``predict`` (the saved head on the test split)."""
    import joblib

    from pipeline.heads import registry
    from pipeline.heads.stream import StreamingLogReg

    t0 = time.perf_counter()
    cache = store.load(path, budget=lazy.parse_budget(budget))
    out = {"op": op, "lazy": lazy.is_lazy(cache), "open_seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    if op == "fit":
        tr, va = cache.train, cache.val
        est = (StreamingLogReg().fit(tr.X, tr.y, (va.X, va.y)) if out["lazy"] else
               registry.build("logreg").fit(np.asarray(tr.X, np.float32), tr.y))
        joblib.dump(est, path + ".head.joblib")
    elif op == "predict":
        est = joblib.load(path + ".head.joblib")
        X = cache.test.X if out["lazy"] else np.asarray(cache.test.X, np.float32)
        out["accuracy"] = float(np.mean(est.predict(X) == cache.test.y))
    out["op_seconds"] = time.perf_counter() - t0
    return out


def measure(path: str, budget: str, work: str) -> dict:
    """Every op on one cache, each a whole command: its wall seconds, peak RSS and what it printed."""
    res = {}
    for op in OPS:
        log = os.path.join(work, f"{os.path.basename(path)}.{op}.log")
        r = run_command([sys.executable, "-m", "pipeline.bench.scale", op, path, budget], log, f"scale {op}")
        with open(log) as f:
            r.update(json.loads(f.read().strip().splitlines()[-1]))
        res[op] = r
    return res


def plot(by_size: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(by_size)
    fig, ax = plt.subplots(figsize=(6, 4))
    for op in OPS:
        ax.loglog(ns, [by_size[n][op]["seconds"] for n in ns], "o-", label=f"{op} (whole command)")
    ax.loglog(ns, [by_size[ns[0]]["fit"]["seconds"] * n / ns[0] for n in ns], "k:", label="linear in rows")
    ax.set_xlabel(f"rows x {DIM} float16")
    ax.set_ylabel("seconds")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(ctx):
    cfg, by_size, m, show = ctx.cfg, {}, {}, []
    for n in sizes(cfg.scale_max):
        path = os.path.join(ctx.work, f"scale-{n}.h5")
        t0 = time.perf_counter()
        synthetic.write_cache(path, n, dim=DIM, classes=CLASSES, dtype="float16")
        m[f"write_{n}"] = (time.perf_counter() - t0, "s")
        by_size[n] = measure(path, cfg.memory_budget, ctx.work)
        for op, r in by_size[n].items():
            m[f"{op}_{n}"], m[f"{op}_rss_{n}"] = stat([r["seconds"]], "s"), stat([r["rss_mib"]], "MiB")
            show += [(f"{op}, {n} rows{' (lazy)' if r['lazy'] else ''}", f"{op}_{n}"),
                     (f"{op} peak RSS, {n} rows", f"{op}_rss_{n}")]
        m[f"accuracy_{n}"] = by_size[n]["predict"]["accuracy"]
        show.append((f"test accuracy, {n} rows", f"accuracy_{n}"))
        for suffix in ("", ".head.joblib"):
            os.remove(path + suffix)
    ns, ratios = sorted(by_size), []
    for a, b in zip(ns, ns[1:]):
        for op in OPS:
            r = by_size[b][op]["seconds"] / by_size[a][op]["seconds"]
            m[f"ratio_{op}_{b}"] = r
            ratios.append(r)
            show.append((f"{op}: time ratio {b} / {a} rows (goal <= {GOAL:g})", f"ratio_{op}_{b}"))
    os.makedirs(cfg.reports_dir, exist_ok=True)
    m["plot"] = (plot(by_size, os.path.join(cfg.reports_dir, f"bench-scale{'-' + cfg.tag if cfg.tag else ''}.png")), "")
    show.append(("log-log plot", "plot"))
    out = {"metrics": m, "show": show, "by_size": {str(n): v for n, v in by_size.items()},
           "note": f"synthetic caches ({CLASSES} classes, {DIM} float16 features) written through the cache "
                   f"writer; MEMORY_BUDGET={cfg.memory_budget}; each op a whole command (imports included), "
                   "peak RSS from os.wait4"}
    if ratios:
        out.update(goal=GOAL, met=max(ratios) <= GOAL)
    return out


if __name__ == "__main__":
    print(json.dumps(child(*sys.argv[1:4])))
