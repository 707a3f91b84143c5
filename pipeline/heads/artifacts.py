"""Saved heads: ``<models>/<cache-stem>/<name>-<sha12>.joblib`` (scikit-learn) or ``.keras`` (dense) beside a
JSON record ``<name>.json``: config, head and parameters, the cache key and path it was trained on, class names,
metrics, versions, the file's name and sha256 and (dense) the training history; with ``CALIBRATE`` and
``REJECT_RECALL`` (:mod:`pipeline.heads.calibrate`) ``temperature``, ``reject_threshold``, ``reject_score`` and
their ``calibration`` figures (absent from older records: they predict uncalibrated); on a feature ensemble
``ensemble``: its members and standardisation (:func:`pipeline.cache.ensemble.record`).

Saved as :mod:`pipeline.artifacts` saves: the model file written in a temporary folder and renamed to a name of
its content, so a new save never replaces the file the current record names; the switch is the record's rename,
and only then are the files no record names (older saves, temporary files of killed ones) removed. Loading
checks the record first — the file's sha256, the cache key when one is expected, the versions — and only then
unpickles (joblib) or loads the Keras model, always with ``safe_mode=True``.

Keras and the dense head are imported lazily, where a dense head is saved or loaded: a scikit-learn head's
loop loads no TensorFlow."""

from __future__ import annotations

import datetime as dt
import glob
import os
import re

import joblib
import numpy as np

from pipeline import artifacts as saved, quiet, records
from pipeline.cache import ensemble, resolve
from pipeline.errors import PipelineError
from pipeline.reports import card as cards

FORMAT = "pipeline-head/1"
SUFFIX = {"sklearn": ".joblib", "keras": ".keras"}


def head_dir(models_dir: str, cache_path: str) -> str:
    return os.path.join(models_dir, resolve.stem(cache_path))


def record_path(models_dir: str, cache_path: str, name: str) -> str:
    """Where the record of head ``name`` trained on ``cache_path`` lives: ``<models>/<stem>/<name>.json``."""
    return os.path.join(head_dir(models_dir, cache_path), name + ".json")


def write_content_named(folder: str, name: str, ext: str, write) -> tuple[str, str]:
    """(path, sha256) of a model file written by ``write(tmp)`` and put in place as ``<folder>/<name>-<sha12><ext>``
    (:func:`pipeline.artifacts.save`), a name no record of an earlier save uses unless the content is the same."""
    return saved.save(folder, name, ext, write)[:2]


def stale(name: str, exts):
    """What the record of ``name`` no longer names once it is switched: its model files (``<name>-<sha12><ext>``,
    a legacy ``<name><ext>``) and what killed saves left (staging folders, temporary records and files)."""
    stem = rf"{re.escape(name)}(-[0-9a-f]{{12}})?"
    model = stem + "(" + "|".join(map(re.escape, exts)) + ")"
    temp = rf"\.{stem}\.((json|joblib|keras)\.)?\w+\.tmp(\.joblib|\.keras)?"
    return re.compile(f"{model}|{temp}")


def remove_stale(folder: str, name: str, keep: str, exts) -> None:
    """Remove what the record of ``name`` no longer names (:func:`stale`) but ``keep``; other names are left."""
    saved.remove_stale(folder, stale(name, exts), {keep})


def record_of(model_path: str) -> str:
    """The record beside a model file: ``<name>-<sha12><ext>`` (or a legacy ``<name><ext>``) -> ``<name>.json``."""
    root = os.path.splitext(model_path)[0]
    return re.sub(r"-[0-9a-f]{12}$", "", root) + ".json"


def jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def save(estimator, *, name, head, params, cache, config, metrics, models_dir, history=None, extra=None) -> str:
    """Save a fitted head and its record; returns the record's path.

    ``cache`` is the :class:`pipeline.cache.store.Cache` it was trained on; ``params`` the head's resolved
    hyper-parameters; ``history`` the Keras history (dense); ``extra`` more fields for the record.
    """
    from pipeline.heads.dense import DenseHead

    kind = "keras" if isinstance(estimator, DenseHead) else "sklearn"
    rec_path = record_path(models_dir, cache.path, name)

    def write(tmp):
        if kind == "keras":
            estimator.model_.save(tmp)
        else:
            joblib.dump(estimator, tmp)

    path, sha = write_content_named(os.path.dirname(rec_path), name, SUFFIX[kind], write)
    record = {
        "format": FORMAT, "kind": kind, "name": name, "head": head,
        "params": {k: jsonable(v) for k, v in params.items()},
        "estimator_params": {k: jsonable(v) for k, v in estimator.get_params(deep=False).items()}
        if kind == "keras" else None,
        "classes": [jsonable(c) for c in estimator.classes_],
        "file": os.path.basename(path), "sha256": sha,
        "cache_key": cache.key, "cache_path": os.path.abspath(cache.path),
        "class_names": list(cache.class_names), "config": config, "metrics": metrics,
        "versions": records.versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "history": history,
        **({"ensemble": ensemble.record(cache)} if isinstance(cache, ensemble.EnsembleCache) else {}),
        **(extra or {}),
    }
    saved.switch(rec_path, record, stale(name, tuple(SUFFIX.values())), {os.path.basename(path)})
    cards.model_card(rec_path, record)  # after the record, atomically
    return rec_path


def find_record(path: str) -> str:
    """The record for ``path``: a record ``.json``, a model file beside its record (``<name>-<sha12>.joblib``
    or a legacy ``<name>.joblib`` -> ``<name>.json``), or a folder holding exactly one record."""
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.json")))
        if len(found) != 1:
            names = ", ".join(os.path.basename(f) for f in found) or "none"
            raise PipelineError(f"{path}: expected one head record in the folder, found {names}; "
                                "name the .json file")
        return found[0]
    if path.endswith(tuple(SUFFIX.values())):
        return record_of(path)
    return path


def check(path: str, expect_key: str | None = None) -> tuple[dict, str]:
    """(record, model file path) after checking the record: format, file present and unchanged (sha256),
    cache key (when ``expect_key``), versions. Nothing is unpickled or loaded here."""
    rec_path = find_record(path)
    rec = records.read_json(rec_path)
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or rec.get("kind") not in SUFFIX:
        raise PipelineError(f"{rec_path}: not a head record of this program")
    model_path = records.checked_file(rec_path, rec, SUFFIX[rec["kind"]], "retrain with make head")
    if expect_key is not None and rec.get("cache_key") != expect_key:
        raise PipelineError(f"{rec_path}: trained on cache {str(rec.get('cache_key'))[:12]}, not on "
                            f"{expect_key[:12]}; retrain it on this cache with make head")
    records.check_versions(rec.get("versions") or {}, rec_path)
    return rec, model_path


def load(path: str, expect_key: str | None = None):
    """(estimator, record) of a saved head; see :func:`check` for what is refused. A dense head comes
    back as a :class:`pipeline.heads.dense.DenseHead` with ``model_``, ``classes_`` and ``history_``."""
    rec, model_path = check(path, expect_key)
    if rec["kind"] == "keras":
        quiet.tensorflow()
        import keras

        from pipeline.heads.dense import DenseHead

        est = DenseHead(**{k: tuple(v) if k == "hidden" else v for k, v in rec["estimator_params"].items()})
        est.model_ = keras.saving.load_model(model_path, safe_mode=True)
        est.classes_ = np.asarray(rec["classes"])
        est.n_features_in_ = int(est.model_.input_shape[-1])
        est.history_ = rec.get("history")
    else:
        est = joblib.load(model_path)
    return est, rec


def load_head(path: str, expect_key: str | None = None):
    """The fitted estimator of a saved head (record ``.json``, model file, or a folder with one record)."""
    return load(path, expect_key)[0]
