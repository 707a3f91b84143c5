"""``overhead``: the bare frozen backbone (a compiled call on images in memory; also with BatchNorm folded, and
OpenVINO's call when installed) and the decoder alone (all cores) vs ``features`` end to end on the same N
images, start-up and steady state apart. On a shared CPU decode and backbone take turns on the same cores, so
extraction's limit is the combined rate ``1 / (1/decode + 1/backbone)`` of the two measured alone."""

from __future__ import annotations

import math
from importlib import metadata

from pipeline.bench.common import GOALS
from pipeline.bench.report import stat

GOAL = GOALS["overhead"]


def goal_images(bare_ips, steady_ips, startup_s, goal):
    """Smallest N at which N images through a run of ``startup_s`` then ``steady_ips`` take at most
    1/goal of the time the bare call takes (inf if the steady rate alone misses the goal)."""
    slack = 1 / bare_ips - goal / steady_ips  # seconds an image saves against the goal in steady state
    return math.ceil(goal * startup_s / slack - 1e-9) if slack > 0 else float("inf")


def combined(decode_ips, backbone_ips):
    """Images per second when every image is decoded then run through the backbone on the same cores, each
    at its own all-core rate: the time per image is the sum of the two."""
    return 1 / (1 / decode_ips + 1 / backbone_ips)


def _folded(ctx, secs, extracts, n, n_pass):
    """(metrics, rows shown, the call's seconds, its name): the folded call, when FOLD_BATCHNORM."""
    if not ctx.cache.get("bare_folded"):
        return {}, [], secs, "tensorflow"
    fsecs = ctx.cache["bare_folded"]
    extra = {"folded_ips": stat([n_pass / s for s in fsecs], "img/s"),
             "fold_speedup": stat([b / f for b, f in zip(secs, fsecs)], "x"),
             "own_ratio": stat([(n / e) / (n_pass / f) for e, f in zip(extracts, fsecs)], "x")}
    show = [(f"bare backbone, {ctx.folds()} BatchNorm folded (extraction's TensorFlow call)", "folded_ips"),
            ("folding speed-up of the bare call, per repeat", "fold_speedup"),
            ("pipeline's own cost: extraction / folded call", "own_ratio")]
    return extra, show, fsecs, "tensorflow, BatchNorm folded"


def _openvino(ctx, tf_secs, own, n, n_pass):
    """(metrics, rows shown, (the call's seconds, its name)): OpenVINO's call, when installed."""
    if not ctx.cache.get("bare_openvino"):
        return {}, [], own
    osecs, hint = ctx.cache["bare_openvino"], ctx.openvino().hint
    extra = {"openvino_version": metadata.version("openvino"),
             "openvino_ips": stat([n_pass / s for s in osecs], "img/s"),
             "openvino_speedup": stat([t / o for t, o in zip(tf_secs, osecs)], "x")}
    show = [(f"bare backbone, OpenVINO {hint} (RUNTIME=openvino's call)", "openvino_ips"),
            ("OpenVINO speed-up over the TensorFlow call, per repeat", "openvino_speedup")]
    if ctx.cfg.runtime == "openvino":
        return extra, show, (osecs, f"openvino {hint}")
    extra["combined_openvino_ips"] = stat([combined(n / d, n_pass / o)
                                           for d, o in zip(ctx.cache["decode"], osecs)], "img/s")
    show.append(("combined limit with OpenVINO's call (RUNTIME=openvino)", "combined_openvino_ips"))
    return extra, show, own


def _steady(ctx, bare_median, combined_median):
    """(metrics, rows shown): the steady rate after the first batch and the start-up, when measured."""
    if not ctx.cache.get("steady"):
        return {}, []
    extra = {"steady_ips": stat([s[0] for s in ctx.cache["steady"]], "img/s"),
             "startup_s": stat([s[1] for s in ctx.cache["steady"]], "s")}
    extra["steady_ratio"] = extra["steady_ips"]["median"] / bare_median
    extra["steady_combined_ratio"] = extra["steady_ips"]["median"] / combined_median
    extra["goal_images"] = goal_images(combined_median, extra["steady_ips"]["median"],
                                       extra["startup_s"]["median"], GOAL)
    return extra, [("features: after the first batch (steady)", "steady_ips"),
                   ("features: start-up (trace or convert + compile, first batch)", "startup_s"),
                   ("ratio steady / combined limit", "steady_combined_ratio"),
                   ("images from which start-up is amortised to the goal", "goal_images")]


def run(ctx):
    cfg = ctx.cfg
    totals, extracts, plans, _ = ctx.e2e(paired=True)
    n_pass, secs, _ = ctx.bare()
    n = ctx.images().n
    m = {"bare_ips": stat([n_pass / s for s in secs], "img/s"),
         "extract_ips": stat([n / s for s in extracts], "img/s"),
         "run_ips": stat([n / s for s in totals], "img/s"),
         "plan_s": stat(plans, "s"),
         "validate_s": stat([ctx.images().validate_seconds], "s"),
         "decode_ips": stat([n / s for s in ctx.cache["decode"]], "img/s")}
    ratio = m["extract_ips"]["median"] / m["bare_ips"]["median"]
    extra, show_folded, own_secs, own_name = _folded(ctx, secs, extracts, n, n_pass)
    more, show_openvino, (own_secs, own_name) = _openvino(ctx, own_secs, (own_secs, own_name), n, n_pass)
    extra.update(more)
    decode = ctx.cache["decode"]
    extra["backbone_ips"] = stat([n_pass / s for s in own_secs], "img/s")
    extra["combined_ips"] = stat([combined(n / d, n_pass / b) for d, b in zip(decode, own_secs)], "img/s")
    extra["combined_paired"] = stat([(n / e) / combined(n / d, n_pass / b)
                                     for e, d, b in zip(extracts, decode, own_secs)], "x")
    combined_ratio = m["extract_ips"]["median"] / extra["combined_ips"]["median"]
    more, show_steady = _steady(ctx, m["bare_ips"]["median"], extra["combined_ips"]["median"])
    extra.update(more)
    paired = stat([(n / e) / (n_pass / b) for e, b in zip(extracts, secs)], "x")
    return {"metrics": {**m, **extra, "ratio": ratio, "paired_ratio": paired, "runtime": cfg.runtime,
                        "backbone_call": own_name, "combined_ratio": combined_ratio,
                        "run_ratio": m["run_ips"]["median"] / m["bare_ips"]["median"]},
            "goal": GOAL, "met": combined_ratio >= GOAL,
            "show": [("decode only: load_resized, one thread per core", "decode_ips"),
                     ("bare backbone, compiled call on arrays", "bare_ips"),
                     *show_folded,
                     *show_openvino,
                     (f"backbone only, extraction's call ({own_name})", "backbone_ips"),
                     ("combined limit 1 / (1/decode + 1/backbone)", "combined_ips"),
                     (f"features (RUNTIME={cfg.runtime}): extraction phase", "extract_ips"),
                     ("features: whole run (plan + extraction)", "run_ips"),
                     ("features: plan (scan, build, weights hash)", "plan_s"),
                     ("first validation of the N images (once)", "validate_s"),
                     *show_steady,
                     (f"ratio extraction / combined limit (goal >= {GOAL})", "combined_ratio"),
                     ("same, per repeat", "combined_paired"),
                     ("ratio extraction / bare call (decode not counted)", "ratio"),
                     ("same, per repeat (bare pass then run)", "paired_ratio"),
                     ("ratio whole run / bare", "run_ratio")],
            "note": "each repeat times a bare pass, the folded call (when FOLD_BATCHNORM), OpenVINO's call "
                    "(when installed) and a decode-only pass of the N images, then a features run (all see "
                    "the same load); combined limit = 1 / (1/decode + 1/backbone) of extraction's own call, "
                    "what decode and backbone sharing the cores allow; extraction phase = decode, resize, "
                    "preprocessing, inference, HDF5 writes, verify and rename of features.extract (start-up "
                    "included); the whole run adds features.Plan (scan with the validation memo warm, model "
                    "build, weights hash)"}
