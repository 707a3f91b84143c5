"""``export`` (only when named): every format x QUANTIZE mode of EXPORT_FORMATS for an EXPORT_HEAD head on
BACKBONE's features of each EXPORT_DATA dataset (cache made or reused by the features step in CACHE_DIR, head
trained by the head step), written and judged as ``make export`` writes and judges them: the artifact by the
format's own tools (:mod:`pipeline.serve.quantize`), run by its own runtime on the whole test split
(:func:`pipeline.serve.judge.judge`: accuracy, agreement with the float Keras model, size, latency at batch 1
and 32, median of REPEATS). The Keras model, the decoded test images, its outputs on them and the int8
calibration images are made once per dataset, not once per export. One table (printed, in the JSON report and
in ``<reports>/bench-export[-tag].md``) and the issue's goals per format: float16 within 0.5 points of the float
Keras model's accuracy at about half the float32 export's size; int8 within 1.5 points at about a quarter of it
and a batch-1 latency at most 0.6 of it.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings

from pipeline import records
from pipeline.backbones.extractor import compiled_call
from pipeline.bench.common import features_config, quiet, shared_dir
from pipeline.configs import ExportConfig, HeadConfig, asdict
from pipeline.errors import PipelineError
from pipeline.heads.train import run_head
from pipeline.serve import find, judge, open_export as exports, quantize, verify
from pipeline.serve.export import without_augmentation
from pipeline.serve.open_export import FORMATS
from pipeline.serve.runner import LINEAR_HEADS

GOALS = {"float16": {"drop": 0.5, "size": 0.55}, "int8": {"drop": 1.5, "size": 0.3, "batch1": 0.6}}
GOALS["int8_io"] = GOALS["int8"]
EXPORTABLE = (*LINEAR_HEADS, "dense")
COLUMNS = ("data", "format", "QUANTIZE", "accuracy", "drop (points)", "agreement", "max prob diff", "MiB",
           "size vs float32", "ms batch 1", "batch 1 vs float32", "ms batch 32", "export s")


def pairs(text: str) -> list[tuple[str, str]]:
    """(format, mode) of each EXPORT_FORMATS entry, ``none`` first for every format."""
    out = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, _, modes = entry.partition(":")
        if name not in FORMATS or len(quantize.POSSIBLE[name]) < 2:
            raise PipelineError(f"EXPORT_FORMATS entry {entry!r}: the format is one of "
                                + ", ".join(f for f, m in quantize.POSSIBLE.items() if len(m) > 1))
        chosen = [m for m in modes.split("+") if m] if modes else list(quantize.POSSIBLE[name])
        for mode in ["none", *chosen]:
            quantize.check(name, mode)
            if (name, mode) not in out:
                out.append((name, mode))
    if not out:
        raise PipelineError("EXPORT_FORMATS is empty: e.g. litert,onnx:int8")
    return out


def datasets(text: str) -> list[str]:
    return [d.strip().replace("{shared}", shared_dir()) for d in text.split(",") if d.strip()]


def check(cfg) -> None:
    if cfg.export_head not in EXPORTABLE:
        raise PipelineError(f"EXPORT_HEAD={cfg.export_head}: one of {', '.join(EXPORTABLE)} (heads with a Keras form)")
    if not datasets(cfg.export_data):
        raise PipelineError("EXPORT_DATA is empty: e.g. digits")
    for name, mode in pairs(cfg.export_formats):
        fmt = FORMATS[name]
        exports.need(fmt, (*fmt.export_needs, fmt.runtime))


def label(data: str) -> str:
    return os.path.basename(data.rstrip(os.sep)) or data


def train(ctx, data: str) -> str:
    """The head's record: the cache made or reused by the features step, the head fitted by the head step."""
    cfg = ctx.cfg
    fcfg = features_config(cfg, data=data, views=0, tta=False)
    hcfg = HeadConfig(**asdict(fcfg), head=cfg.export_head, memory_budget=cfg.memory_budget,
                      models_dir=os.path.join(ctx.work, "export-models"),
                      reports_dir=os.path.join(ctx.work, "export-reports"), calibrate="none", reject_recall=0.0)
    with quiet():
        return run_head(hcfg, log=lambda m: None)["record"]


def judge_all(ctx, record: str, chosen, name: str) -> dict:
    """Every (format, mode) of ``chosen`` written from the head's Keras model and judged on the whole test split."""
    cfg, ecfg = ctx.cfg, ExportConfig()
    runner = find.open_model(record, os.path.dirname(os.path.dirname(record)), log=lambda m: None)
    original = runner.keras_model()
    model = without_augmentation(original)
    pixels, labels = judge.test_set(runner, f"bench export on {name}")
    reference = verify.batched(compiled_call(original, runner.size, fold=False), pixels, ecfg.batch)
    representative = judge.representative(runner, cfg.export_representative)
    out = {"record": record, "cache": runner.source.get("cache_path"), "test_images": int(len(pixels)),
           "classes": len(runner.classes), "rows": []}
    for fmt_name, mode in chosen:
        fmt = FORMATS[fmt_name]
        target = os.path.join(ctx.work, f"export-{fmt_name}-{mode}{fmt.ext}")
        t0 = time.perf_counter()
        try:
            with quiet(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*will be truncated to.*")  # onnxconverter-common's float16
                if mode == "none":
                    verify.write_artifact(model, fmt, target, runner.size)
                else:
                    quantize.write(model, fmt, mode, target, runner.size, verify.write_artifact, representative)
            secs = time.perf_counter() - t0
            call = exports.runtime(fmt, target, runner.size, fold=False)
            row = judge.judge(call, reference, pixels, labels, target, runner.output, cfg.repeats, ecfg.batch)
            row["export_seconds"] = secs
        except PipelineError as e:
            row = {"error": str(e)}
        out["rows"].append({"format": fmt_name, "mode": mode, **row})
        _remove(target)
        ctx.log(f"bench: export {name} {fmt_name} {mode}: " + (row.get("error") or
                f"accuracy {row['accuracy']:.4f}, {row['bytes'] / 2**20:.2f} MiB, batch 1 {row['ms_batch1']:.1f} ms"))
    return out


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def ratios(rows: list, row: dict) -> dict:
    """Each row's drop in points below the float Keras model and its size and batch-1 latency over the format's
    float32 export's."""
    base = next((r for r in rows if r["format"] == row["format"] and r["mode"] == "none"), {})
    if "error" in row:
        return {}
    r = {"drop": 100 * (row["float_accuracy"] - row["accuracy"])}
    if "error" not in base and base:
        r.update(size=row["bytes"] / base["bytes"], batch1=row["ms_batch1"] / base["ms_batch1"])
    return r


def verdict(mode: str, r: dict) -> tuple[bool, str]:
    """(met, what it says) of one float16 or int8 row's ratios against the issue's goals."""
    goal = GOALS[mode]
    ok = bool(r) and all(k in r and r[k] <= limit for k, limit in goal.items())
    said = ", ".join(f"{k} {r[k]:.{2 if k == 'drop' else 3}f}{' points' if k == 'drop' else 'x'} "
                     f"({'<=' if r[k] <= limit else 'missed, goal <='} {limit:g})"
                     for k, limit in goal.items() if k in r)
    return ok, ("met" if ok else "NOT met") + f": {said or 'no figures'}"


def table(by_data: dict) -> str:
    """One Markdown table: every dataset x format x mode."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, d in by_data.items():
        for row in d["rows"]:
            fmt, mode = row["format"], row["mode"]
            if "error" in row:
                lines.append(f"| {name} | {fmt} | {mode} | failed: {row['error'][:100]} |" + " |" * (len(COLUMNS) - 4))
                continue
            r = ratios(d["rows"], row)
            cells = [name, fmt, mode, f"{row['accuracy']:.4f}", f"{r['drop']:+.2f}", f"{row['agreement']:.4f}",
                     f"{row['max_prob_diff']:.4f}", f"{row['bytes'] / 2**20:.2f}", _x(r.get("size")),
                     f"{row['ms_batch1']:.2f}", _x(r.get("batch1")), f"{row['ms_batch32']:.1f}",
                     f"{row['export_seconds']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}x"


def run(ctx):
    cfg = ctx.cfg
    chosen, by_data, m, show, verdicts = pairs(cfg.export_formats), {}, {}, [], []
    for data in datasets(cfg.export_data):
        name = label(data)
        t0 = time.perf_counter()
        record = train(ctx, data)
        by_data[name] = {"train_seconds": time.perf_counter() - t0, **judge_all(ctx, record, chosen, name)}
        d = by_data[name]
        d["float_accuracy"] = next((r["float_accuracy"] for r in d["rows"] if "error" not in r), None)
        for row in d["rows"]:
            fmt, mode = row["format"], row["mode"]
            key = f"{name}_{fmt}_{mode}"
            m[key] = (row["error"][:60], "failed") if "error" in row else (
                row["accuracy"], _detail(row, ratios(d["rows"], row)))
            show.append((f"{name} {fmt} {mode}: test accuracy", key))
            if mode in GOALS:
                verdicts.append((f"goal: {name} {fmt} {mode}", verdict(mode, ratios(d["rows"], row))[1]))
    text = table(by_data)
    os.makedirs(cfg.reports_dir, exist_ok=True)
    path = os.path.join(cfg.reports_dir, f"bench-export{'-' + cfg.tag if cfg.tag else ''}.md")
    cpu = judge.cpu_name()
    records.atomic_write_text(path, f"# Export bench\n\n{text}\n\nlatency: median of {cfg.repeats} runs on {cpu}\n")
    m["table"] = (path, "")
    show.append(("the table", "table"))
    ctx.log(text)
    return {"datasets": by_data, "table": text, "cpu": cpu, "metrics": m, "show": show, "verdicts": verdicts,
            "goal": "float16: drop <= 0.5 points, size <= 0.55x; int8: drop <= 1.5 points, size <= 0.3x, "
                    "batch 1 <= 0.6x (of the format's float32 export)",
            "met": bool(verdicts) and all(v.startswith("met") for _, v in verdicts),
            "note": f"{cfg.export_head} head on {cfg.backbone} features ({', '.join(by_data)}); each export written "
                    f"as make export writes it and judged on the whole test split in its own runtime; int8 "
                    f"calibrated on {cfg.export_representative} train images; latency: median of {cfg.repeats} "
                    f"runs after one warm-up on {cpu}; drop in points below the float Keras model"}


def _detail(row: dict, r: dict) -> str:
    return (f"drop {r['drop']:+.2f} pts, agree {row['agreement']:.3f}, {row['bytes'] / 2**20:.2f} MiB"
            + (f" ({r['size']:.2f}x)" if "size" in r else "") + f", b1 {row['ms_batch1']:.1f} ms"
            + (f" ({r['batch1']:.2f}x)" if "batch1" in r else "") + f", b32 {row['ms_batch32']:.0f} ms")

