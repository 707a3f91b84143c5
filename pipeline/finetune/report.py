"""After phase 2: head only vs fine-tuned on val and test, the reports (metrics, confusion matrix, both phases'
curves) and the exported model with its record."""

from __future__ import annotations

import os

import numpy as np

from pipeline import records
from pipeline.cache import resolve
from pipeline.configs import asdict
from pipeline.finetune import artifact
from pipeline.finetune.job import HEAD_NAME, NAME, Job
from pipeline.finetune.train import identity, run_dir
from pipeline.heads import artifacts
from pipeline.reports import evaluate
from pipeline.heads import train as head_train


def combined_history(phase1: dict | None, rows: list) -> tuple[dict, int]:
    """(history over phase 1 then phase 2, the number of phase-1 epochs): the keys both phases have."""
    phase1 = {k: [float(v) for v in vals] for k, vals in (phase1 or {}).items()}
    phase2 = {}
    for row in rows:
        for k, v in row.items():
            if k not in ("epoch", "seconds"):
                phase2.setdefault(k, []).append(v)
    n1 = len(phase1.get("loss", []))
    if not phase2 or not n1:
        return (phase1 if not phase2 else phase2), n1
    return {k: phase1[k] + phase2[k] for k in phase2 if k in phase1}, n1


def comparison(head_only: dict, tuned: dict) -> str:
    """Head only vs fine-tuned, side by side: val and test accuracy, test balanced and top-k accuracy."""
    lines = [f"{'':<26}{'head only':>12}{'fine-tuned':>12}{'change':>10}"]
    for split in ("val", "test"):
        for key in ("accuracy", "balanced_accuracy", *sorted(k for k in tuned[split] if k.startswith("top_"))):
            if split == "val" and key != "accuracy":
                continue
            a, b = head_only[split].get(key), tuned[split].get(key)
            if a is None or b is None:
                continue
            label = f"{split} {key.replace('_', ' ')}"
            lines.append(f"{label:<26}{a:>12.4f}{b:>12.4f}{b - a:>+10.4f}")
    return "\n".join(lines)


def evaluate_model(job: Job, split: str) -> dict:
    """Metrics of the end-to-end model on a split's images (the same metrics as ``make head``)."""
    if job.call is None:
        job.call = artifact.compiled(job.model, job.size)
    p = artifact.probabilities(job.call, job.images(split))
    y = np.asarray([job.plan.ds.items[i].label for i in job.split(split)])
    return evaluate.metrics(y, p.argmax(1), job.cache.class_names, p)


def finish(job: Job, result: dict, log=None) -> dict:
    """Evaluate head only and fine-tuned on val and test, print the comparison, write the reports (metrics,
    confusion matrix, combined history and curves), export the model with its record. Returns the paths."""
    log = log or job.log
    cfg, cache = job.cfg, job.cache
    head_only = {s: head_train.measure(job.head, cache, s) for s in ("val", "test")}
    tuned = {s: evaluate_model(job, s) for s in ("val", "test")}
    n_test = tuned["test"]["n"]
    log(evaluate.table(tuned["test"], f"{NAME} ({cfg.unfreeze}): test split ({n_test} images)"))
    log("head only (phase 1, on cached features) vs fine-tuned (phase 2, end to end):\n"
        + comparison(head_only, tuned))
    rows = result["rows"]
    history, n1 = combined_history(job.head.history_, rows)
    secs = [r["seconds"] for r in rows]
    stem = resolve.stem(cache.path)
    out = os.path.join(cfg.reports_dir, stem, NAME)
    m = {"head": HEAD_NAME, "head_record": os.path.abspath(job.head_record_path),
         "head_params": job.head_record.get("params"), "unfreeze": job.unfreeze, "parameters": job.parameters,
         "epochs": len(rows), "best_epoch": result["best_epoch"] + 1 if result["best_epoch"] >= 0 else 0,
         "resumed_at_epoch": result["resumed_at"], "seconds_per_epoch": float(np.mean(secs)) if secs else None,
         "fit_seconds": float(np.sum(secs)), "baseline": result["baseline"],
         "head_only": head_only, "val": tuned["val"], "test": tuned["test"]}
    paths = evaluate.write_reports(
        out, m, f"{NAME} on {stem}",
        history={"phase2_start": n1, "combined": history, "phase1": job.head.history_, "phase2": rows},
        curves=history, curves_title=f"{NAME} on {stem}: dense head on the cache, then UNFREEZE={cfg.unfreeze}",
        phase_start=n1)
    spec, plan = job.plan.spec, job.plan
    config = {**asdict(cfg), "size": plan.size, "features": asdict(plan.cfg), "identity": plan.identity}
    paths["record"] = artifact.export(
        job.model, os.path.join(artifacts.head_dir(cfg.models_dir, cache.path), NAME + ".keras"),
        class_names=cache.class_names, size=plan.size, interpolation=plan.cfg.interpolation,
        extra={"backbone": spec.name, "alpha": plan.cfg.alpha or spec.alpha, "preprocessing": spec.preprocess,
               "pooling": plan.cfg.pooling, "weights": plan.identity["weights"], "config": config,
               "cache_key": cache.key, "cache_path": os.path.abspath(cache.path),
               "head": {"record": os.path.abspath(job.head_record_path), "sha256": job.head_record["sha256"],
                        "params": job.head_record.get("params")},
               "unfreeze": job.unfreeze, "parameters": job.parameters, "metrics": m,
               "history": history, "phase2_start": n1, "identity": identity(job)})
    if result["best_epoch"] >= 0:
        paths["checkpoint"] = os.path.join(run_dir(job), f"best-{result['best_epoch'] + 1:03d}.keras")
    log(f"saved {paths['record']} (+ {records.read_json(paths['record'])['file']}) and reports in {out}/"
        + (f"; {len(rows)} epoch(s), {m['seconds_per_epoch']:.1f} s each" if secs else ""))
    return paths
