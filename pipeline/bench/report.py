"""The ``bench`` step's bookkeeping: repeat statistics, machine facts, the screen table and the reports
(``<reports>/bench-<date>[-tag].json`` and ``.md``, written atomically).
What a measurement needs (TensorFlow, Keras, the steps it runs) is imported lazily, in the function that
measures: ``make bench`` imports only the sections it runs."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform

import numpy as np

from pipeline import records


def stat(values, unit: str) -> dict:
    """Median and spread (min, max) of repeated measurements, with the raw values."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("no measurement")
    return {"median": float(np.median(v)), "min": min(v), "max": max(v), "n": len(v), "values": v, "unit": unit}


def machine() -> dict:
    """CPU model, cores, memory, OS and Python of this machine."""
    cpu = platform.processor() or platform.machine()
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": affinity, "simd": simd,
            "memory_gib": round(mem, 1) if mem else None, "os": platform.platform(),
            "python": platform.python_version(), "gpus": _gpus()}


def _gpus():
    try:
        import tensorflow as tf

        return [d.name for d in tf.config.list_physical_devices("GPU")]
    except Exception:  # noqa: BLE001 - a report detail, never a failure
        return []


def now() -> dt.datetime:
    return dt.datetime.now().astimezone()


def report_paths(reports_dir: str, when: dt.datetime, tag: str = "") -> tuple[str, str]:
    stem = f"bench-{when.strftime('%Y-%m-%d-%H%M%S')}" + (f"-{tag}" if tag else "")
    base = os.path.join(reports_dir, stem)
    return base + ".json", base + ".md"


# ----------------------------------------------------------------------------------------- formatting

def _num(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{x:,}"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.{max(digits - 1, 0)}f}"
    return f"{x:.{digits}g}"


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, figure, median, spread, unit) for every figure of every section that ran."""
    out = []
    for name, sec in result["sections"].items():
        if "error" in sec:
            out.append((name, "failed", "-", "", sec["error"][:80]))
            continue
        for label, key in sec.get("show", []):
            m = sec["metrics"][key] if key in sec["metrics"] else None
            if isinstance(m, dict) and "median" in m:
                spread = f"{_num(m['min'])}–{_num(m['max'])}" if m["n"] > 1 else "(1 run)"
                out.append((name, label, _num(m["median"]), spread, m["unit"]))
            elif m is not None:
                val, unit = (m if isinstance(m, tuple) else (m, ""))
                out.append((name, label, val if isinstance(val, str) else _num(val), "", unit))
        for label, text in sec.get("verdicts", []):
            out.append((name, label, text, "", ""))
    return out


def header(result: dict) -> list[str]:
    m, b = result["machine"], result["backbone"]
    v = result["versions"]
    load = result.get("load_average") or {}
    return [f"bench {result['date']}  {m['cpu']}, {m['usable_cores']} cores"
            + (f", GPU {', '.join(m['gpus'])}" if m["gpus"] else ", no GPU")
            + f"; load average {load.get('start')} at start, {load.get('end')} at end",
            f"tensorflow {v.get('tensorflow')}, keras {v.get('keras')}, h5py {v.get('h5py')}, numpy {v.get('numpy')}",
            f"backbone {b['name']} size {b['size']} alpha {b['alpha']} weights {b['weights']}, batch {b['batch']}, "
            f"N={result['config']['n']} images of {result['config']['data']}; "
            f"median of {result['config']['repeats']} repeat(s) after {result['config']['warmup']} warm-up"]


def table(result: dict) -> str:
    """The screen table."""
    rs = rows(result)
    w = [max(len(r[i]) for r in rs + [("section", "figure", "median", "min–max", "unit")]) for i in range(5)]
    line = lambda r: f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:<{w[3]}}  {r[4]}"  # noqa: E731
    out = header(result) + ["", line(("section", "figure", "median", "min–max", "unit")),
                            "  ".join("-" * x for x in w)]
    prev = None
    for r in rs:
        out.append(line(r if r[0] != prev else ("",) + r[1:]))
        prev = r[0]
    notes = [f"{n}: {s['note']}" for n, s in result["sections"].items() if s.get("note")]
    return "\n".join(out + ([""] + notes if notes else []))


def markdown(result: dict) -> str:
    out = ["# Benchmark", ""] + [f"- {h}" for h in header(result)] + [
        "", "| section | figure | median | min–max | unit |", "| --- | --- | ---: | --- | --- |"]
    for r in rows(result):
        out.append("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
    notes = [(n, s["note"]) for n, s in result["sections"].items() if s.get("note")]
    if notes:
        out += ["", "## Notes", ""] + [f"- **{n}**: {t}" for n, t in notes]
    quality = result["sections"].get("quality", {}).get("rows")
    if quality:
        out += ["", "## Quality: every head", "", "| model | head | val accuracy | test accuracy |",
                "| --- | --- | ---: | ---: |"]
        for q in quality:
            for h in q.get("heads", []):
                out.append(f"| {q['label']} | {h['head']} | {_num(h.get('val'))} | {_num(h.get('test'))} |")
    out += ["", f"Machine: `{result['machine']}`", "", f"Versions: `{result['versions']}`", ""]
    return "\n".join(out)


def write(result: dict, reports_dir: str, when: dt.datetime, tag: str = "") -> tuple[str, str]:
    """The JSON and Markdown reports, each written to a temporary file renamed into place."""
    json_path, md_path = report_paths(reports_dir, when, tag)
    records.write_json(json_path, result)
    records.atomic_write_text(md_path, markdown(result))
    return json_path, md_path
