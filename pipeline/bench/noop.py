"""``noop``: the wall time of an unchanged ``features`` rerun, in process and as a whole command."""

from __future__ import annotations

import os

from pipeline.bench.common import features_args, quiet, run_child, timed
from pipeline.bench.report import stat
from pipeline.cache import extract as features
from pipeline.errors import PipelineError


def run(ctx):
    cfg = ctx.cfg
    fcfg = ctx.cache.get("mem-small")
    if fcfg is None:
        fcfg = ctx.images().fcfg(cfg, os.path.join(ctx.work, "noop"))
        with quiet():
            features.run(fcfg, log=lambda m: None)
    msgs = []

    def in_process():
        with quiet():
            features.run(fcfg, log=msgs.append)

    secs, _ = timed(in_process, cfg.repeats, cfg.warmup)
    if not any(m.startswith("up to date") for m in msgs):
        raise PipelineError("the unchanged rerun was not up to date")
    cmd = [run_child(["features", *features_args(fcfg)], os.path.join(ctx.work, f"noop-{k}.log"))["seconds"]
           for k in range(cfg.repeats)]
    with open(os.path.join(ctx.work, f"noop-{cfg.repeats - 1}.log")) as f:
        if "up to date" not in f.read():
            raise PipelineError("the unchanged command rerun was not up to date")
    return {"metrics": {"in_process_s": stat(secs, "s"), "command_s": stat(cmd, "s")},
            "show": [("unchanged rerun, features.run in process", "in_process_s"),
                     ("unchanged rerun, whole command", "command_s")],
            "note": "an unchanged rerun scans the images (validation memo warm), builds the backbone to "
                    "hash its weights and finds the cache up to date; the command adds Python and "
                    "TensorFlow start-up"}
