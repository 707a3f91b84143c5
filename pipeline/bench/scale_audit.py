"""The scale section's audit part: the audit's label-issue and duplicate sections (``pipeline.reports.audit``, run
as the audit runs them) on one synthetic cache, each in a whole command of its own. The audit loads a cache
whole, so a cache whose float64 copy exceeds MEMORY_BUDGET is not audited: :func:`refusal` says so in one line.

``python -m pipeline.bench.scale_audit labels|duplicates CACHE BUDGET`` is the measured child.

The audit and the report page are imported lazily, in the child process that uses them."""

from __future__ import annotations

import json
import os
import sys
import time

from pipeline.cache import lazy, store
from pipeline.configs import AuditConfig

OPS = ("labels", "duplicates")


def refusal(path: str, budget: str) -> str | None:
    """Why the audit is not run on the cache ``path`` (its rows as float64 exceed ``budget``), or None."""
    need = lazy.footprint(path)
    if need <= lazy.parse_budget(budget):
        return None
    return (f"not run: the audit loads a cache whole and a float64 copy of its rows ({need / 2**30:.1f} GiB) "
            f"exceeds MEMORY_BUDGET={budget}")


def out_dir(path: str) -> str:
    """Where the children write the sections' CSV files: beside the cache."""
    return os.path.splitext(path)[0] + "-audit"


def child(op: str, path: str, budget: str) -> dict:
    """One audit section (``labels`` or ``duplicates``) on the cache at ``path``: {"op", "lazy", "open_seconds",
    "op_seconds", "summary": the section's numbers and texts}."""
    from pipeline.reports import html
    from pipeline.reports.audit import Skipped, step

    t0 = time.perf_counter()
    cache = store.load(path, budget=lazy.parse_budget(budget))
    out = {"op": op, "lazy": lazy.is_lazy(cache), "open_seconds": time.perf_counter() - t0}
    title, run = {key: (title, fn) for key, title, fn in step.SECTIONS}[op]
    cfg = AuditConfig(cache=path, memory_budget=budget, reports_dir=os.path.dirname(path))
    ctx = step.Context(cache, cfg, out_dir(path), log=lambda m: None)
    os.makedirs(ctx.out, exist_ok=True)
    t0 = time.perf_counter()
    try:
        summary = run(ctx, html.Page(title).section(title))
    except Skipped as e:
        summary = {"skipped": str(e)}
    out["op_seconds"] = time.perf_counter() - t0
    out["summary"] = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and not k.endswith("csv")}
    return out


if __name__ == "__main__":
    print(json.dumps(child(*sys.argv[1:4])))
