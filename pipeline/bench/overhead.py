"""``overhead``: the bare frozen backbone (a compiled call on images in memory; also with BatchNorm folded)
vs ``features`` end to end on the same N images, start-up and steady state apart."""

from __future__ import annotations

import math

from pipeline.bench.common import GOALS
from pipeline.bench.report import stat


def goal_images(bare_ips, steady_ips, startup_s, goal):
    """Smallest N at which N images through a run of ``startup_s`` then ``steady_ips`` take at most
    1/goal of the time the bare call takes (inf if the steady rate alone misses the goal)."""
    slack = 1 / bare_ips - goal / steady_ips  # seconds an image saves against the goal in steady state
    return math.ceil(goal * startup_s / slack - 1e-9) if slack > 0 else float("inf")



def run(ctx):
    totals, extracts, plans, _ = ctx.e2e(paired=True)
    n_pass, secs, _ = ctx.bare()
    n = ctx.images().n
    m = {"bare_ips": stat([n_pass / s for s in secs], "img/s"),
         "extract_ips": stat([n / s for s in extracts], "img/s"),
         "run_ips": stat([n / s for s in totals], "img/s"),
         "plan_s": stat(plans, "s"),
         "validate_s": stat([ctx.images().validate_seconds], "s")}
    ratio = m["extract_ips"]["median"] / m["bare_ips"]["median"]
    extra, show_steady = {}, []
    if ctx.cache.get("steady"):
        extra = {"steady_ips": stat([s[0] for s in ctx.cache["steady"]], "img/s"),
                 "startup_s": stat([s[1] for s in ctx.cache["steady"]], "s")}
        extra["steady_ratio"] = extra["steady_ips"]["median"] / m["bare_ips"]["median"]
        extra["goal_images"] = goal_images(m["bare_ips"]["median"], extra["steady_ips"]["median"],
                                           extra["startup_s"]["median"], GOALS["overhead"])
        show_steady = [("features: after the first batch (steady)", "steady_ips"),
                       ("features: start-up (trace + first batch)", "startup_s"),
                       ("ratio steady / bare", "steady_ratio"),
                       ("images from which start-up is amortised to the goal", "goal_images")]
    paired = stat([(n / e) / (n_pass / b) for e, b in zip(extracts, secs)], "x")
    show_folded = []
    if ctx.cache.get("bare_folded"):
        fsecs = ctx.cache["bare_folded"]
        extra["folded_ips"] = stat([n_pass / s for s in fsecs], "img/s")
        extra["fold_speedup"] = stat([b / f for b, f in zip(secs, fsecs)], "x")
        extra["own_ratio"] = stat([(n / e) / (n_pass / f) for e, f in zip(extracts, fsecs)], "x")
        show_folded = [(f"bare backbone, {ctx.folds()} BatchNorm folded (extraction's call)", "folded_ips"),
                       ("folding speed-up of the bare call, per repeat", "fold_speedup"),
                       ("pipeline's own cost: extraction / folded call", "own_ratio")]
    return {"metrics": {**m, **extra, "ratio": ratio, "paired_ratio": paired,
                        "run_ratio": m["run_ips"]["median"] / m["bare_ips"]["median"]},
            "goal": GOALS["overhead"], "met": ratio >= GOALS["overhead"],
            "show": [("bare backbone, compiled call on arrays", "bare_ips"),
                     *show_folded,
                     ("features: extraction phase", "extract_ips"),
                     ("features: whole run (plan + extraction)", "run_ips"),
                     ("features: plan (scan, build, weights hash)", "plan_s"),
                     ("first validation of the N images (once)", "validate_s"),
                     *show_steady,
                     ("ratio extraction / bare (goal >= 0.9)", "ratio"),
                     ("same, per repeat (bare pass then run)", "paired_ratio"),
                     ("ratio whole run / bare", "run_ratio")],
            "note": "each repeat is a bare pass (and a pass of the folded call, when FOLD_BATCHNORM) "
                    "followed by a features run (all see the same load); "
                    "extraction phase = decode, resize, preprocessing, inference, HDF5 writes, verify and "
                    "rename of features.extract; the whole run adds features.Plan (scan with the validation "
                    "memo warm, model build, weights hash)"}
