"""The exported end-to-end model: one ``finetune-<sha12>.keras`` file taking raw RGB pixels (augmentation inert,
preprocessing inside) beside a JSON record ``finetune.json`` — format, class names, input size and
interpolation, config, metrics, versions, the file's name and sha256 — both written atomically, the model file
under a name of its content so that the record's rename is the switch (as for heads,
:mod:`pipeline.heads.artifacts`). Loading checks the record first (format, file unchanged, versions) and only
then loads the model, with ``safe_mode=True``. Keras is imported lazily, by what loads or runs the model:
predict reads every record through this module, for models that run without TensorFlow too."""

from __future__ import annotations

import datetime as dt
import glob
import os

import numpy as np

from pipeline import records
from pipeline.errors import PipelineError
from pipeline.reports import card as cards
from pipeline.heads import artifacts

FORMAT = "pipeline-finetune/1"
RECORD = "finetune.json"


def export(model, path: str, *, class_names, size: int, interpolation: str = "bilinear", extra=None) -> str:
    """Save ``model`` (raw (N, size, size, 3) pixels -> class probabilities) for ``path`` (``<folder>/<name>.keras``)
    as ``<name>-<sha12>.keras`` and its record ``<name>.json``, each atomically; the model files and temporary
    files the new record does not name are removed after it is in place. Returns the record's path."""
    if not path.endswith(".keras"):
        raise PipelineError(f"{path}: the exported model file must end in .keras")
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)[:-len(".keras")]
    model_path, sha = artifacts.write_content_named(folder, name, ".keras", model.save)
    record = {
        **(extra or {}),
        "format": FORMAT, "file": os.path.basename(model_path), "sha256": sha,
        "classes": list(class_names), "input_size": int(size),
        "input": {"shape": [int(size), int(size), 3], "pixels": "RGB, 0..255 (uint8 or float)",
                  "resize": "the whole image to size x size, aspect not kept", "interpolation": interpolation},
        "versions": records.versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    rec_path = path[:-len(".keras")] + ".json"
    records.write_json(rec_path, record)  # the switch: until here the previous record and its file stand
    artifacts.remove_stale(folder, name, os.path.basename(model_path), (".keras",))
    cards.model_card(rec_path, record)  # after the record, atomically
    return rec_path


def find_record(path: str = "", models_dir: str = "models", log=print) -> str:
    """The record of an exported model: ``path`` (a record, its ``finetune-<sha12>.keras`` file or a legacy
    ``finetune.keras``, or a folder holding finetune.json), or when empty the newest
    ``<models_dir>/*/finetune.json``."""
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
    if path.endswith(".keras"):
        return artifacts.record_of(path)
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

    from pipeline.backbones import layers  # noqa: F401  registers the Preprocess and InferenceMode layers

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


def compiled(model, size: int):
    """The model's inference call, compiled once for (N, size, size, 3) uint8 batches, BatchNorm folded."""
    from pipeline.backbones.extractor import compiled_call

    return compiled_call(model, size, fold=True)


def probabilities(call, batches) -> np.ndarray:
    """(N, n_classes) float64 probabilities of uint8 pixel batches (one sigmoid unit -> two columns)."""
    out = [np.asarray(call(x)) for x in batches]
    p = np.concatenate(out).astype(np.float64) if out else np.zeros((0, 1))
    if p.shape[1] == 1:
        p = np.hstack([1.0 - p, p])
    return p
