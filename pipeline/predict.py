"""The exported end-to-end model and ``predict``: label image files and folders with it.

The export is one ``.keras`` file taking raw RGB pixels (augmentation inert, preprocessing inside) beside a
JSON record — format, class names, input size and interpolation, config, metrics, versions, the file's
sha256 — both written atomically. Loading checks the record first (format, file unchanged, versions) and
only then loads the model, with ``safe_mode=True``.
"""

from __future__ import annotations

import datetime as dt
import glob
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline import images, records
from pipeline.config import opt
from pipeline.errors import PipelineError

FORMAT = "pipeline-finetune/1"
RECORD = "finetune.json"


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``predict``: which images, which exported model, how many labels each."""

    images: str = opt("", "image files and/or folders, space-separated (quote paths with spaces); "
                          "bare arguments are added")
    model: str = opt("", "exported model: its .json record, .keras file or folder (default: the newest "
                         "<MODELS_DIR>/*/finetune.json)")
    models_dir: str = opt("models", "where make finetune saved its models")
    top_k: int = opt(3, "labels shown per image (most probable first)")
    batch: int = opt(32, "images per model call")
    output: str = opt("", "also write the predictions to this file (.json, else tab-separated)")


# --- export and load ----------------------------------------------------------------------------------------

def export(model, path: str, *, class_names, size: int, interpolation: str = "bilinear", extra=None) -> str:
    """Save ``model`` (raw (N, size, size, 3) pixels -> class probabilities) to ``path`` (.keras) and its
    record beside it (.json), each atomically; returns the record's path."""
    if not path.endswith(".keras"):
        raise PipelineError(f"{path}: the exported model file must end in .keras")
    with records.atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
        sha = records.file_digest(tmp)
    record = {
        **(extra or {}),
        "format": FORMAT, "file": os.path.basename(path), "sha256": sha,
        "classes": list(class_names), "input_size": int(size),
        "input": {"shape": [int(size), int(size), 3], "pixels": "RGB, 0..255 (uint8 or float)",
                  "resize": "the whole image to size x size, aspect not kept", "interpolation": interpolation},
        "versions": records.versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    rec_path = path[:-len(".keras")] + ".json"
    records.write_json(rec_path, record)
    return rec_path


def find_record(path: str = "", models_dir: str = "models", log=print) -> str:
    """The record of an exported model: ``path`` (a record, its .keras file or a folder holding
    finetune.json), or when empty the newest ``<models_dir>/*/finetune.json``."""
    if not path:
        found = sorted(glob.glob(os.path.join(models_dir, "*", RECORD)), key=os.path.getmtime)
        if not found:
            raise PipelineError(f"no fine-tuned model under {models_dir}/: run make finetune, or pass MODEL=path")
        if len(found) > 1:
            log(f"using the newest of {len(found)} fine-tuned models: {found[-1]} (MODEL=path to choose)")
        return found[-1]
    if os.path.isdir(path):
        rec = os.path.join(path, RECORD)
        if not os.path.exists(rec):
            raise PipelineError(f"{path}: no {RECORD} in this folder; name the record or .keras file")
        return rec
    root, ext = os.path.splitext(path)
    if ext == ".keras":
        return root + ".json"
    return path


def check(path: str) -> tuple[dict, str]:
    """(record, model file) after checking the record: format, fields, the file present and unchanged
    (sha256), the versions. Nothing is loaded here."""
    if not os.path.exists(path):
        raise PipelineError(f"{path}: no such model record; run make finetune or pass MODEL=path")
    rec = records.read_json(path)
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a fine-tuned model record of this program (format {FORMAT})")
    missing = [k for k in ("file", "sha256", "classes", "input_size", "versions") if k not in rec]
    if missing:
        raise PipelineError(f"{path}: record lacks {', '.join(missing)}; rerun make finetune")
    model_path = records.checked_file(path, rec, ".keras", "rerun make finetune")
    records.check_versions(rec.get("versions") or {}, path)
    return rec, model_path


def load(path: str):
    """(model, record) of an exported model (record, .keras file or folder), checked (see :func:`check`)."""
    import keras

    from pipeline import extractor  # noqa: F401  registers the Preprocess layer

    rec, model_path = check(find_record(path))
    try:
        model = keras.saving.load_model(model_path, safe_mode=True, compile=False)
    except Exception as e:  # keras raises ValueError, TypeError, OSError... for damaged archives
        raise PipelineError(f"{model_path}: cannot be loaded ({str(e).splitlines()[0][:200]}); "
                            "rerun make finetune") from None
    size, n = rec["input_size"], len(rec["classes"])
    if tuple(model.input_shape[1:]) != (size, size, 3) or model.output_shape[-1] not in ((1,) if n == 2 else (n,)):
        raise PipelineError(f"{model_path}: takes {model.input_shape} and gives {model.output_shape}, its record "
                            f"says {size}x{size}x3 and {n} classes; rerun make finetune")
    return model, rec


# --- prediction ---------------------------------------------------------------------------------------------

def compiled(model, size: int):
    """The model's inference call, compiled once for (N, size, size, 3) uint8 batches, BatchNorm folded."""
    from pipeline.extractor import compiled_call

    return compiled_call(model, size, fold=True)


def probabilities(call, batches) -> np.ndarray:
    """(N, n_classes) float64 probabilities of uint8 pixel batches (one sigmoid unit -> two columns)."""
    out = [np.asarray(call(x)) for x in batches]
    p = np.concatenate(out).astype(np.float64) if out else np.zeros((0, 1))
    if p.shape[1] == 1:
        p = np.hstack([1.0 - p, p])
    return p


def image_paths(specs) -> tuple[list[str], list[tuple[str, str]], int]:
    """(files, problems, ignored) of the given files and folders: a folder gives its image files (recursively,
    hidden ones and other extensions ignored); a named file is always tried; a missing path is a problem."""
    files, problems, ignored = [], [], 0
    exts = tuple("." + e for e in images.IMAGE_EXTENSIONS)
    for spec in specs:
        if os.path.isdir(spec):
            for dirpath, dirnames, filenames in os.walk(spec, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not images.is_hidden(d))
                for name in sorted(filenames):
                    if images.is_hidden(name) or not name.lower().endswith(exts):
                        ignored += 1
                        continue
                    files.append(os.path.join(dirpath, name))
        elif os.path.exists(spec):
            files.append(spec)
        else:
            problems.append((spec, "no such file or folder"))
    return files, problems, ignored


def split_images(text: str) -> list[str]:
    """``IMAGES``: one existing path as it is, else shell-style words (quote paths with spaces)."""
    text = text.strip()
    if not text:
        return []
    if os.path.exists(text):
        return [text]
    try:
        return shlex.split(text)
    except ValueError as e:
        raise PipelineError(f"IMAGES={text!r}: {e}") from None


def label(call, record, files, top_k=3, batch=32):
    """(results, problems): per readable file {"path", "top": [(class, probability), ...]} in input order;
    per unreadable file (path, reason). Files are decoded in parallel, as for training (size, interpolation)."""
    size, interp = record["input_size"], (record.get("input") or {}).get("interpolation", "bilinear")
    classes = record["classes"]
    k = max(1, min(top_k, len(classes)))

    def decode(path):
        try:
            return images.load_resized(path, size, interp), None
        except images.BadImage as e:
            return None, str(e)

    results, problems = [], []
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            good, pixels = [], []
            for path, (x, why) in zip(chunk, pool.map(decode, chunk)):
                if x is None:
                    problems.append((path, why))
                else:
                    good.append(path)
                    pixels.append(x)
            if not good:
                continue
            p = probabilities(call, [np.stack(pixels)])
            for path, row in zip(good, p):
                order = np.argsort(-row, kind="stable")[:k]
                results.append({"path": path, "top": [(classes[i], float(row[i])) for i in order]})
    return results, problems


def write_output(path, results, problems) -> None:
    if path.lower().endswith(".json"):
        records.write_json(path, {"predictions": [{"path": r["path"], "top": [{"label": c, "probability": p}
                                                                              for c, p in r["top"]]}
                                                  for r in results],
                                  "unreadable": [{"path": p, "reason": why} for p, why in problems]})
        return
    k = max((len(r["top"]) for r in results), default=0)
    head = ["path"] + [f"{x}_{i}" for i in range(1, k + 1) for x in ("label", "probability")] + ["error"]
    lines = ["\t".join(head)]
    for r in results:
        lines.append("\t".join([r["path"], *[f"{v}" for c, p in r["top"] for v in (c, f"{p:.6f}")], ""]))
    for p, why in problems:
        lines.append("\t".join([p] + [""] * (2 * k) + [why]))
    records.atomic_write_text(path, "\n".join(lines) + "\n")


def run(cfg: PredictConfig, extra=None, log=print, err=None) -> int:
    """The ``predict`` step: prints the top-k labels of every readable image; unreadable ones are reported
    (on stderr) and the rest still labelled. Exit status 0, or 1 when some input could not be labelled."""
    err = err or (lambda m: print(m, file=sys.stderr))
    specs = split_images(cfg.images)
    if not specs:
        raise PipelineError("no images given: make predict IMAGES='photo.jpg folder/' or "
                            "python -m pipeline predict PATH...")
    if cfg.top_k < 1 or cfg.batch < 1:
        raise PipelineError("TOP_K and BATCH must be positive")
    files, problems, ignored = image_paths(specs)
    if not files:
        for p, why in problems:
            err(f"skipped {p}: {why}")
        raise PipelineError(f"no image files in {', '.join(specs)}")
    rec_path = find_record(cfg.model, cfg.models_dir, log=err)
    model, rec = load(rec_path)
    call = compiled(model, rec["input_size"])
    results, bad = label(call, rec, files, cfg.top_k, cfg.batch)
    problems += bad
    width = max(len(r["path"]) for r in results) if results else 0
    for r in results:
        log(f"{r['path']:<{width}}  " + "  ".join(f"{c} {p:.3f}" for c, p in r["top"]))
    for p, why in problems:
        err(f"skipped {p}: {why}")
    if cfg.output:
        write_output(cfg.output, results, problems)
    note = f", {ignored} non-image file(s) ignored" if ignored else ""
    err(f"labelled {len(results)} image(s) with {rec_path}{note}"
        + (f"; {len(problems)} could not be read" if problems else ""))
    return 1 if problems else 0
