"""``MODEL_CARD.md``: the Markdown sections every model's card shares (what it is, the data, the metrics, versions,
limitations, a runnable snippet), written beside each head record, fine-tuned model and export (which adds its
judgement table, :mod:`pipeline.serve.card`)."""

from __future__ import annotations

import json
import os

import numpy as np

from pipeline import records
from pipeline.cache import resolve, store
from pipeline.errors import PipelineError


def path_of(rec_path: str) -> str:
    """``<record without .json>.MODEL_CARD.md``."""
    return rec_path[:-len(".json")] + ".MODEL_CARD.md"


def table(head, rows) -> str:
    return "\n".join(["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join("—" if v is None else str(v) for v in r) + " |" for r in rows])


def data(cache_path, key, reports_dir=None) -> list[str]:
    """The data section: the source and its images per class and split, from the cache file; what the audit of
    that cache flagged when one ran under ``reports_dir``."""
    if not cache_path:
        return ["The record names no cache file; its counts cannot be given."]
    try:
        cache = store.load(cache_path, expect_key=key)
    except (PipelineError, OSError):
        return [f"The cache {cache_path} is gone; its counts cannot be given."]
    splits = sorted(cache.splits, key=lambda s: (("train", "val", "test") + (s,)).index(s))
    rows = [[c, *[int(np.sum(cache.splits[s].labels == i)) for s in splits]] for i, c in enumerate(cache.class_names)]
    return [f"Images of `{cache.config.get('data')}`, per class and split (cache `{os.path.basename(cache_path)}`):",
            "", table(["class", *splits], rows + [["all", *[len(cache.splits[s].labels) for s in splits]]]),
            "", *audit(cache_path, reports_dir)]


def audit(cache_path, reports_dir) -> list[str]:
    """What ``make audit`` flagged on the cache at ``cache_path`` (its ``summary.json`` under ``reports_dir``),
    or how to run it."""
    if not reports_dir:
        return []
    path = os.path.join(reports_dir, resolve.stem(cache_path), "audit", "summary.json")
    try:
        with open(path) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return ["No audit of this cache was found (`make audit` with the same options looks for label issues, "
                "duplicates, outliers and the class balance)."]
    out = [f"What the audit flagged (`{os.path.join(os.path.dirname(path), 'index.html')}`):", ""]
    for key, text in (("labels", "label issues"), ("duplicates", "duplicates and leaks"), ("outliers", "outliers"),
                      ("balance", "class balance")):
        sec = s.get(key) or {}
        if "skipped" in sec:
            line = f"skipped ({sec['skipped']})"
        elif key == "labels":
            line = f"{sec.get('flagged', '?')} of {sec.get('images', '?')} train+val images may be mislabelled"
        elif key == "duplicates":
            line = (f"{sec.get('exact_groups', 0)} groups of identical images ({sec.get('exact_across_splits', 0)} "
                    f"across splits), {sec.get('near', 0)} near-duplicate pairs across splits")
        elif key == "outliers":
            line = "most isolated: " + (", ".join(f"`{os.path.basename(p)}`" for p in sec.get("top", [])[:3])
                                        or "none")
        else:
            line = sec.get("warning") or "no class more than 3x another"
        out.append(f"- {text}: {line}")
    return out


def metrics(source: dict, record: dict, what: str = "the model (on its cached features)",
            applied: str = "make predict and pipeline.predict") -> list[str]:
    """Test accuracy and per-class figures of ``source``'s metrics; temperature and threshold of ``record``."""
    test = ((source.get("metrics") or {}).get("test")) or {}
    out = [f"Test accuracy of {what}: {test['accuracy']:.4f} on {test.get('n')} images."
           if "accuracy" in test else "The model's record has no test metrics."]
    per = test.get("per_class") or {}
    if per:
        out += ["", table(["class", "precision", "recall", "f1", "support"],
                          [[c, *(round(v.get(k, 0), 4) for k in ("precision", "recall", "f1-score")), v.get("support")]
                           for c, v in per.items()])]
    for key, text in (("temperature", "calibration temperature"), ("reject_threshold", "unknown-image threshold "
                                                                   "on the maximum probability")):
        if record.get(key) is not None:
            out.append(f"\n{text.capitalize()}: {record[key]:.4g} (applied by {applied}).")
    return out


def limitations(record: dict) -> list[str]:
    return ["- Trained and judged on the images above only; photos unlike them (other classes, framing, lighting) "
            "get one of these labels all the same" + (", unless below the unknown-image threshold." if
                                                     record.get("reject_threshold") is not None else "."),
            "- Small test splits give coarse accuracies."]


def reports_dir(record: dict) -> str | None:
    """The REPORTS_DIR a record's run wrote to (a fine-tuned model's is in its head options)."""
    cfg = record.get("config") or {}
    head = cfg.get("head") if isinstance(cfg.get("head"), dict) else {}
    return cfg.get("reports_dir") or head.get("reports_dir")


def render(title: str, what: list[str], cache_path, key, metric_lines: list[str], versions: dict, record: dict,
           run: tuple[str, str], extra: list[str] = (), limits: list[str] = ()) -> str:
    """The card: ``what`` (bullets), the data of the cache, ``metric_lines``, ``extra`` sections, versions,
    limitations and ``run`` = (how, Python snippet)."""
    return "\n".join([f"# Model card: {title}", "", "## What it is", "", *what, "",
                      "## Data", "", *data(cache_path, key, reports_dir(record)), "",
                      "## Metrics", "", *metric_lines, "", *extra,
                      "## Versions", "", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v), "",
                      "## Limitations", "", *limitations(record), *limits, "",
                      "## Run it", "", run[0], "", "```python", run[1], "```", ""])


def predict_snippet(rec_path: str) -> str:
    """Python that labels ``IMAGE`` with the record at ``rec_path`` through this package's ``pipeline.predict``."""
    return "\n".join(["import pipeline", "", f"MODEL = {os.path.abspath(rec_path)!r}", "IMAGE = 'photo.jpg'", "",
                      "[result] = pipeline.predict(IMAGE, model=MODEL, top_k=1)",
                      "label, probability = result['top'][0]", "print(label, float(probability))"])


def write(rec_path: str, text: str) -> str:
    """Write ``text`` as the card of the record at ``rec_path`` (atomically); returns its path."""
    path = path_of(rec_path)
    records.atomic_write_text(path, text)
    return path


def _cached_size(cache_path):
    try:
        return store.load(cache_path).config.get("size") if cache_path else None
    except (PipelineError, OSError):
        return None


def model_card(rec_path: str, record: dict) -> str:
    """Write the card of a head record (``make head``/``sweep``) or a fine-tuned model's (``make finetune``);
    returns its path."""
    fine = str(record.get("format", "")).startswith("pipeline-finetune")
    cfg = record.get("config") or {}
    feats = (cfg.get("features") if fine else cfg) or {}
    classes = record.get("class_names") or record.get("classes") or []
    size = record.get("input_size") or feats.get("size") or _cached_size(record.get("cache_path"))
    what = [("- a fine-tuned model (make finetune): pixels -> preprocessing -> backbone -> pooling -> dense head"
             if fine else f"- a {record.get('head')} head ({record.get('kind')}) on the backbone's cached features"),
            f"- backbone {record.get('backbone') or feats.get('backbone')}, input size "
            f"{size}, preprocessing and pooling as the cache's "
            f"({feats.get('pooling', 'avg')} pooling, {feats.get('interpolation', 'bilinear')} resize, aspect not kept)",
            f"- classes ({len(classes)}): {', '.join(map(str, classes))}",
            f"- file `{record.get('file')}` (sha256 {str(record.get('sha256'))[:12]}), cache key "
            f"`{record.get('cache_key')}`"]
    text = render(os.path.basename(rec_path)[:-len(".json")], what, record.get("cache_path"), record.get("cache_key"),
                  metrics(record, record, "the fine-tuned model" if fine else "the head (on its cached features)"),
                  record.get("versions") or {}, record,
                  ("With this package installed (or on PYTHONPATH), after setting `IMAGE`:", predict_snippet(rec_path)))
    return write(rec_path, text)
