"""``headloop``: the wall time of a whole ``make head`` command on a warm cache (HEAD=logreg and HEAD=dense)
against the fit alone: what the loop of head experiments costs beyond the fit itself. Also the wall time of
a whole ``make sweep`` over every head."""

from __future__ import annotations

import glob
import json
import os
import sys

from pipeline.bench.common import GOALS, features_args, features_config, quiet, run_child, run_command
from pipeline.bench.report import stat
from pipeline.cache import extract

HEADS = ("logreg", "dense")
# what a head's command cannot avoid importing (its data, its fit, its figures), ended the way the command ends:
# the floor under its time beyond the fit on this machine, the interpreter's teardown of those modules included.
# The dense head's command imports TensorFlow and Keras before its fit's clock starts, so its floor has them too
FLOOR = "import numpy, h5py, sklearn.linear_model, matplotlib.figure, matplotlib.backends.backend_agg"
FLOORS = {"logreg": FLOOR, "dense": FLOOR + ", tensorflow, keras"}


def run(ctx):
    cfg = ctx.cfg
    fcfg = features_config(cfg)  # the configured data and cache folder: a warm cache, as a user has it
    with quiet():
        extract.run(fcfg, log=lambda m: None)
    m, show = {}, []
    for head in HEADS:
        walls, fits, floors = [], [], []
        for k in range(cfg.warmup + cfg.repeats):
            floor = run_command([sys.executable, "-c", FLOORS[head]], os.path.join(ctx.work, f"floor-{head}.log"),
                                f"the {head} import floor")
            out = os.path.join(ctx.work, f"headloop-{head}-{k}")
            r = run_child(["head", *features_args(fcfg), f"HEAD={head}", f"MODELS_DIR={out}/models",
                           f"REPORTS_DIR={out}/reports"], out + ".log")
            with open(glob.glob(os.path.join(out, "reports", "*", head, "metrics.json"))[0]) as f:
                fit = json.load(f)["fit_seconds"]
            if k >= cfg.warmup:
                walls.append(r["seconds"])
                fits.append(fit)
                floors.append(floor["seconds"])
        m[f"{head}_wall"], m[f"{head}_fit"] = stat(walls, "s"), stat(fits, "s")
        m[f"{head}_beyond_fit"] = stat([w - f for w, f in zip(walls, fits)], "s")
        m[f"{head}_floor"] = stat(floors, "s")
        m[f"{head}_beyond_floor"] = stat([w - f - fl for w, f, fl in zip(walls, fits, floors)], "s")
        m[f"{head}_ratio"] = m[f"{head}_wall"]["median"] / max(m[f"{head}_fit"]["median"], 1e-9)
        show += [(f"make head HEAD={head}: whole command", f"{head}_wall"), ("  its fit alone", f"{head}_fit"),
                 (f"  beyond the fit (goal <= {GOALS['headloop']} s)", f"{head}_beyond_fit"),
                 (f"  floor: python -c '{FLOORS[head]}'", f"{head}_floor"),
                 ("  beyond the fit and the floor", f"{head}_beyond_floor"),
                 ("  ratio command / fit", f"{head}_ratio")]
    out = os.path.join(ctx.work, "headloop-sweep")
    sweep = run_child(["sweep", *features_args(fcfg), f"MODELS_DIR={out}/models", f"REPORTS_DIR={out}/reports"],
                      out + ".log")
    m["sweep_wall"] = (sweep["seconds"], "s")
    show.append(("make sweep, every head, CV=5: whole command (goal <= 60 s)", "sweep_wall"))
    worst = max(m[f"{h}_beyond_fit"]["median"] for h in HEADS)
    return {"metrics": m, "show": show, "goal": GOALS["headloop"], "met": worst <= GOALS["headloop"],
            "note": f"whole commands on the warm cache of DATA={cfg.data} (scan with the memos warm, the cache "
                    "proven current without TensorFlow, load, fit, reports, save); the sweep once"}
