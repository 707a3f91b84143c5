"""``bench``: speed, memory and accuracy of the pipeline side by side, as ratios measured in one run.

Sections (``SECTIONS=``, comma list), one module each: :mod:`.overhead`, :mod:`.caching`, :mod:`.ceiling`,
:mod:`.memory`, :mod:`.noop`, :mod:`.quality`, :mod:`.headloop`, :mod:`.peer`, and only when named
:mod:`.views`, :mod:`.scale`, :mod:`.audit` and :mod:`.export`; :mod:`.common` holds what they share and :mod:`.report` the table and the JSON/Markdown
reports. Each timed figure is the median of REPEATS runs after WARMUP untimed ones; min and max are kept.

What a measurement needs (TensorFlow, Keras, the steps it runs) is imported lazily, in the function that
measures: ``make bench`` imports only the sections it runs."""

from __future__ import annotations

import importlib
import shutil
import time

from pipeline import records
from pipeline.bench import report as benchreport
from pipeline.bench.common import load_average
from pipeline.bench.context import Context
from pipeline.configs import BenchConfig, asdict
from pipeline.errors import PipelineError

SECTION_MODULES = {"overhead": "overhead", "caching": "caching", "ceiling": "ceiling", "memory": "memory",
                   "noop": "noop", "quality": "quality", "headloop": "headloop", "peer": "peer", "views": "views",
                   "scale": "scale", "audit": "audit", "export": "export"}


def run(cfg: BenchConfig, log=print) -> dict:
    """Measure the chosen sections, print the table, write the JSON and Markdown reports."""
    ctx = Context(cfg, log)
    modules = {name: importlib.import_module(f"pipeline.bench.{SECTION_MODULES[name]}") for name in ctx.sections}
    try:
        for module in modules.values():  # a section's own options: one line before any work
            getattr(module, "check", lambda cfg: None)(cfg)
    except PipelineError:
        shutil.rmtree(ctx.work, ignore_errors=True)
        raise
    when = benchreport.now()
    load_start = load_average()
    import tensorflow  # noqa: F401  imported before any timing

    log(f"bench: sections {', '.join(ctx.sections)}; {cfg.backbone} at {ctx.size}, batch {cfg.batch}, "
        f"N={cfg.n}, {cfg.repeats} repeat(s) after {cfg.warmup} warm-up; work folder {ctx.work}")
    try:
        for name in ctx.sections:
            t0 = time.perf_counter()
            log(f"bench: {name} ...")
            try:
                ctx.results[name] = modules[name].run(ctx)
            except PipelineError as e:
                ctx.results[name] = {"error": str(e)}
                log(f"bench: {name} failed: {e}")
            ctx.results[name]["seconds"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    result = {"date": when.isoformat(timespec="seconds"), "machine": benchreport.machine(),
              "load_average": {"start": load_start, "end": load_average()},
              "versions": records.versions(), "config": asdict(cfg),
              "backbone": {"name": ctx.spec.name, "size": ctx.size, "alpha": cfg.alpha or ctx.spec.alpha,
                           "weights": cfg.weights, "batch": cfg.batch, "pooling": cfg.pooling,
                           "dtype": cfg.dtype},
              "sections": ctx.results}
    for sec in ctx.results.values():
        if "met" in sec:
            sec.setdefault("verdicts", []).append(
                ("goal", ("met" if sec["met"] else "NOT met") + f" (goal {sec['goal']})"))
    paths = benchreport.write(result, cfg.reports_dir, when, cfg.tag)
    log(benchreport.table(result))
    log(f"wrote {paths[0]} and {paths[1]}")
    result["paths"] = paths
    return result


def step(cfg: BenchConfig, extra=None) -> None:
    """The ``bench`` step."""
    run(cfg)
