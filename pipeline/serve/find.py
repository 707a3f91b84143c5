"""Which model a command means (a record, a model file, a folder, or the default), opened as a runner after
its record checks out. Keras is imported lazily, for a fine-tuned model: predict imports this module for
models that run without TensorFlow too."""

from __future__ import annotations

import glob
import os

from pipeline import quiet, records
from pipeline.data import images
from pipeline.errors import PipelineError
from pipeline.finetune import artifact
from pipeline.heads import artifacts
from pipeline.serve.runner import EXPORT_FORMAT, FINETUNE_FORMAT, HEAD_FORMAT, SHA12, Runner
from pipeline.serve.open_export import open_export
from pipeline.serve.open_head import open_head


def _record_format(path):
    try:
        rec = records.read_json(path)
    except PipelineError:
        return None
    return rec.get("format") if isinstance(rec, dict) else None


def _newest(paths):
    return sorted(paths, key=os.path.getmtime)[-1] if paths else None


def default_model(models_dir="models", log=print) -> str:
    """The newest fine-tuned model (``<models>/*/finetune.json``), else the best head of the newest sweep
    (``<models>/*/best.json``), else the newest head record."""
    tuned = glob.glob(os.path.join(models_dir, "*", artifact.RECORD))
    if tuned:
        if len(tuned) > 1:
            log(f"using the newest of {len(tuned)} fine-tuned models: {_newest(tuned)} (MODEL=path to choose)")
        return _newest(tuned)
    best = [p for p in glob.glob(os.path.join(models_dir, "*", "best.json")) if _record_format(p) == HEAD_FORMAT]
    if best:
        log(f"no fine-tuned model: using the best head of the last sweep, {_newest(best)} (MODEL=path to choose)")
        return _newest(best)
    heads = [p for p in glob.glob(os.path.join(models_dir, "*", "*.json")) if _record_format(p) == HEAD_FORMAT]
    if heads:
        log(f"no fine-tuned model nor sweep: using the newest head, {_newest(heads)} (MODEL=path to choose)")
        return _newest(heads)
    raise PipelineError(f"no model under {models_dir}/ (no fine-tuned model, sweep or head): run make finetune, "
                        "make sweep or make head, or pass MODEL=path")


def find_model(path: str = "", models_dir: str = "models", log=print) -> str:
    """The record of ``path``: a record (.json), a model file or folder beside its record (finetune-<sha12>.keras,
    <head>-<sha12>.joblib, an exported artifact), a folder holding finetune.json or exactly one record; when
    empty, :func:`default_model`."""
    if not path:
        return default_model(models_dir, log)
    path = path.rstrip(os.sep) or path
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, artifact.RECORD)):
            return os.path.join(path, artifact.RECORD)
        beside = record_beside(path)
        if SHA12.search(os.path.basename(path)) and os.path.exists(beside):  # a SavedModel / OpenVINO export
            return beside
        return artifacts.find_record(path)
    parent = os.path.dirname(path)
    if path.endswith((".xml", ".bin", ".pb")) and SHA12.search(os.path.basename(parent)):
        return record_beside(parent)  # a file inside an exported folder
    if not path.endswith(".json"):
        return record_beside(path)
    return path


def record_beside(path: str) -> str:
    """The record of a model file or exported folder: ``<name>-<sha12>[.ext]`` (or a legacy ``<name>.ext``) ->
    ``<name>.json`` beside it."""
    name = os.path.basename(path.rstrip(os.sep))
    stem = name if os.path.isdir(path) else os.path.splitext(name)[0]
    return os.path.join(os.path.dirname(path.rstrip(os.sep)), SHA12.sub("", stem) + ".json")


def open_model(path: str = "", models_dir: str = "models", log=print, fold=True) -> Runner:
    """The :class:`Runner` of a model record (or anything :func:`find_model` takes), after its record checks out.
    ``fold``: Keras models run with BatchNorm folded into the convolutions (the cache's way)."""
    rec_path = find_model(path, models_dir, log)
    if not os.path.exists(rec_path):
        raise PipelineError(f"{rec_path}: no such model record; run make finetune, make head or make export, "
                            "or pass MODEL=path")
    rec = records.read_json(rec_path)
    fmt = rec.get("format") if isinstance(rec, dict) else None
    if fmt == FINETUNE_FORMAT:
        return _finetuned(rec_path, fold)
    if fmt == HEAD_FORMAT:
        return open_head(rec_path, log, fold)
    if fmt == EXPORT_FORMAT:
        return open_export(rec_path)
    raise PipelineError(f"{rec_path}: not a model record of this program (a fine-tuned model, a head or an "
                        "export)")


def _finetuned(rec_path, fold):
    quiet.tensorflow()
    from pipeline.backbones.extractor import compiled_call

    model, rec = artifact.load(rec_path)
    size = int(rec["input_size"])
    cfg = rec.get("config") or {}
    return Runner(rec_path, rec, "finetune", list(rec["classes"]), size,
                  (rec.get("input") or {}).get("interpolation", "bilinear"), "probability",
                  compiled_call(model, size, fold=fold), keras_model=lambda: model,
                  source={"name": "finetune", "backbone": rec.get("backbone"), "cache_path": rec.get("cache_path"),
                          "cache_key": rec.get("cache_key"), "features": cfg.get("features"),
                          "sha256": rec["sha256"]},
                  max_pixels=int((cfg.get("features") or {}).get("max_pixels") or images.MAX_PIXELS))
