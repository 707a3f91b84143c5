"""``scale`` (only when named): synthetic caches of 10^4, 10^5 (and 10^6 with ``SCALE_MAX=1000000``) rows x 1,280
float16 with a known class structure, written through the cache writer; per size, each in a subprocess of its
own (wall time and peak RSS from ``os.wait4``): open + verify (cold), the logreg head's fit (in memory within
MEMORY_BUDGET, streamed past it), predict on the test split, and the audit's label-issue and duplicate sections
(:mod:`.scale_audit`; not run past MEMORY_BUDGET, said in one line); the time ratio per 10x rows. Then the
extraction of synthetic JPEG trees of 10^3 to 10^5 images (:mod:`.scale_images`). A log-log plot of both.

``python -m pipeline.bench.scale open|fit|predict CACHE BUDGET`` is the measured child.

The heads and matplotlib are imported lazily, in the child processes and the plot that use them."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from pipeline.bench import scale_audit, scale_images, synthetic
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
    scale_images.check(cfg)


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


def measure(path: str, budget: str, work: str, ops=OPS, module: str = __name__) -> dict:
    """Every op of ``ops`` on one cache, each a whole command (``python -m module op path budget``): its wall
    seconds, peak RSS and what it printed."""
    res = {}
    for op in ops:
        log = os.path.join(work, f"{os.path.basename(path)}.{op}.log")
        r = run_command([sys.executable, "-m", module, op, path, budget], log, f"scale {op}")
        with open(log) as f:
            r.update(json.loads(f.read().strip().splitlines()[-1]))
        res[op] = r
    return res


def plot(by_size: dict, path: str, by_images: dict | None = None) -> str:
    """Log-log: each op's whole-command seconds against rows; with ``by_images`` also the features step's
    extraction rate and every command's peak RSS against images or rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns, imgs = sorted(by_size), sorted(by_images or {})
    fig, axes = plt.subplots(1, 3 if imgs else 1, figsize=(15 if imgs else 6, 4), squeeze=False)
    ax = axes[0][0]
    for op in OPS + scale_audit.OPS:
        got = [n for n in ns if "seconds" in by_size[n].get(op, {})]
        if got:
            ax.loglog(got, [by_size[n][op]["seconds"] for n in got], "o-", label=f"{op} (whole command)")
    ax.loglog(ns, [by_size[ns[0]]["fit"]["seconds"] * n / ns[0] for n in ns], "k:", label="linear in rows")
    ax.set(xlabel=f"rows x {DIM} float16", ylabel="seconds")
    if imgs:
        ax = axes[0][1]
        ax.loglog(imgs, [by_images[n]["extract_ips"] for n in imgs], "o-", label="extraction (start-up included)")
        steady = [n for n in imgs if by_images[n]["steady_ips"]]
        if steady:
            ax.loglog(steady, [by_images[n]["steady_ips"] for n in steady], "s-", label="extraction (steady)")
        ax.set(xlabel=f"synthetic {scale_images.SIDE}x{scale_images.SIDE} JPEGs", ylabel="images / s")
        ax = axes[0][2]
        ax.loglog(imgs, [by_images[n]["rss_mib"] for n in imgs], "o-", label="features (images)")
        for op in OPS + scale_audit.OPS:
            got = [n for n in ns if "rss_mib" in by_size[n].get(op, {})]
            if got:
                ax.loglog(got, [by_size[n][op]["rss_mib"] for n in got], ".--", label=f"{op} (rows)")
        ax.set(xlabel="images or rows", ylabel="peak RSS, MiB")
    for ax in axes[0]:
        ax.legend(fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def measure_size(cfg, n: int, work: str) -> dict:
    """One synthetic cache of ``n`` rows written, every op and audit section measured on it, then removed."""
    path = os.path.join(work, f"scale-{n}.h5")
    t0 = time.perf_counter()
    synthetic.write_cache(path, n, dim=DIM, classes=CLASSES, dtype="float16", hashes=True)
    write = time.perf_counter() - t0
    res = measure(path, cfg.memory_budget, work)
    refused = scale_audit.refusal(path, cfg.memory_budget)
    res.update({op: {"refused": refused} for op in scale_audit.OPS} if refused else
               measure(path, cfg.memory_budget, work, scale_audit.OPS, scale_audit.__name__))
    for suffix in ("", ".head.joblib"):
        os.remove(path + suffix)
    shutil.rmtree(scale_audit.out_dir(path), ignore_errors=True)
    return {"write_seconds": write, **res}


def figures(by_size: dict) -> tuple[dict, list, list]:
    """(metrics, show rows, ratios against GOAL {"ops": ..., "audit": ...}) of the caches measured."""
    m, show = {}, []
    for n in sorted(by_size):
        m[f"write_{n}"] = (by_size[n]["write_seconds"], "s")
        for op in OPS + scale_audit.OPS:
            r = by_size[n][op]
            if "refused" in r:
                m[f"{op}_{n}"] = (r["refused"], "")
                show.append((f"audit {op}, {n} rows", f"{op}_{n}"))
                continue
            m[f"{op}_{n}"], m[f"{op}_rss_{n}"] = stat([r["seconds"]], "s"), stat([r["rss_mib"]], "MiB")
            m[f"{op}_own_{n}"] = stat([r["open_seconds" if op == "open" else "op_seconds"]], "s")
            what = f"audit {op}" if op in scale_audit.OPS else op
            show += [(f"{what}, {n} rows{' (lazy)' if r['lazy'] else ''}", f"{op}_{n}"),
                     (f"{what} inside the command, {n} rows", f"{op}_own_{n}"),
                     (f"{what} peak RSS, {n} rows", f"{op}_rss_{n}")]
        m[f"accuracy_{n}"] = by_size[n]["predict"]["accuracy"]
        show.append((f"test accuracy, {n} rows", f"accuracy_{n}"))
    ns, ratios = sorted(by_size), {"ops": [], "audit": []}
    for a, b in zip(ns, ns[1:]):
        for op in OPS + scale_audit.OPS:
            if "seconds" in by_size[a][op] and "seconds" in by_size[b][op]:
                m[f"ratio_{op}_{b}"] = by_size[b][op]["seconds"] / by_size[a][op]["seconds"]
                ratios["audit" if op in scale_audit.OPS else "ops"].append(m[f"ratio_{op}_{b}"])
                show.append((f"{op}: time ratio {b} / {a} rows (goal <= {GOAL:g})", f"ratio_{op}_{b}"))
    return m, show, ratios


def run(ctx):
    cfg = ctx.cfg
    by_size = {n: measure_size(cfg, n, ctx.work) for n in sizes(cfg.scale_max)}
    m, show, ratios = figures(by_size)
    images = scale_images.run(ctx)
    m.update(images["metrics"])
    show += images["show"]
    os.makedirs(cfg.reports_dir, exist_ok=True)
    png = os.path.join(cfg.reports_dir, f"bench-scale{'-' + cfg.tag if cfg.tag else ''}.png")
    m["plot"] = (plot(by_size, png, images["by_images"]), "")
    show.append(("log-log plot", "plot"))
    verdicts = list(images["verdicts"])
    if ratios["audit"]:
        verdicts.append(("audit sections: time ratio per 10x rows", ("met" if max(ratios["audit"]) <= GOAL else
                                                                     "NOT met") + f" (goal <= {GOAL:g})"))
    out = {"metrics": m, "show": show, "verdicts": verdicts, "by_size": {str(n): v for n, v in by_size.items()},
           "by_images": {str(n): v for n, v in images["by_images"].items()},
           "note": f"synthetic caches ({CLASSES} classes, {DIM} float16 features, content hashes) written through "
                   f"the cache writer; MEMORY_BUDGET={cfg.memory_budget}; each op and audit section a whole command "
                   "(imports included), peak RSS from os.wait4; synthetic JPEG trees "
                   f"({scale_images.CLASSES} classes, {scale_images.SIDE}x{scale_images.SIDE}) through "
                   f"python -m pipeline features ({cfg.backbone}), rates from its log"}
    if ratios["ops"]:
        out.update(goal=GOAL, met=max(ratios["ops"]) <= GOAL)
    return out


if __name__ == "__main__":
    print(json.dumps(child(*sys.argv[1:4])))
