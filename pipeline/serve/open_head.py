"""Heads as runners: a dense head end to end; a scikit-learn head on the features of the extractor of its
cache, rebuilt from the cache's record and checked against it (the weights digest); on a cache made with
RUNTIME=openvino, either head on the features of the cache's stored OpenVINO model (TensorFlow not imported); a
head on a feature ensemble by :mod:`pipeline.serve.open_ensemble`.

Keras (the extractor, :mod:`pipeline.serve.keras_form`) is imported lazily, where a model needs it and only
after ``KERAS_HOME`` is set and TensorFlow quietened: a head on an OpenVINO cache predicts without it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pipeline import quiet, records
from pipeline.backbones import registry as backbones, runtime
from pipeline.cache import ensemble, store
from pipeline.configs import FeaturesConfig, asdict
from pipeline.data import images
from pipeline.errors import PipelineError
from pipeline.heads import artifacts, registry
from pipeline.serve.runner import Runner

# --- heads: the extractor of the cache, rebuilt and checked ----------------------------------------------------

def cache_config(rec: dict, rec_path: str) -> tuple[dict, dict | None, str | None]:
    """(features options, the cache's identity or None, a note or None) of a head record: the cache file's own
    record when the file is there (and is the cache the head was trained on), else the head record's options,
    said so in the note."""
    cache_path = rec.get("cache_path") or ""
    if cache_path and os.path.exists(cache_path):
        try:
            meta = store.check_header(cache_path, expect_key=rec.get("cache_key"))
        except PipelineError as e:
            problem = f"its cache cannot be read ({e})"
        else:
            cfg = meta["config"]
            return {**asdict(FeaturesConfig()), **cfg}, cfg.get("identity"), None
    else:
        problem = f"its cache {cache_path or '(none recorded)'} is gone"
    config = rec.get("config") or {}
    if config.get("cache"):
        raise PipelineError(f"{rec_path}: {problem}, and the head was trained on CACHE={config['cache']}, so its "
                            "record does not say how the features were made; restore the cache file or retrain "
                            "the head with make head")
    return ({**asdict(FeaturesConfig()), **{k: v for k, v in config.items() if k in asdict(FeaturesConfig())}},
            None, f"{problem}: the extractor is rebuilt from the head record's options, and its weights cannot "
                  "be checked against the cache")


def gem_p(fc: dict) -> float:
    """POOLING=gem's exponent of features options ``fc`` (a cache made before GEM_P existed: the default)."""
    return float(fc.get("gem_p") or FeaturesConfig().gem_p)


def rebuild_extractor(fc: dict, identity: dict | None, where: str, precision: str | None = None):
    """(spec, size, extractor, base) of the features options ``fc``: the extractor of ``make features``, with
    the weights file the cache recorded. With the cache's ``identity`` the weights digest must be the one the
    cache was made with."""
    records.use_keras_home(fc.get("keras_home") or "")  # before Keras is imported: Keras reads it once
    quiet.tensorflow()
    from pipeline.backbones import extractor

    spec = backbones.get(fc["backbone"])
    size = backbones.resolve_size(spec, fc.get("size"))
    recorded = (identity or {}).get("weights") or {}
    weights = fc["weights"]
    if recorded.get("source") == "file" and recorded.get("file"):
        weights = recorded["file"]  # the absolute path the cache was made from
    try:
        model, base = extractor.build(spec, size, weights, fc["pooling"], alpha=fc.get("alpha") or None,
                                      seed=int(fc.get("seed") or 0), precision=precision or fc.get("precision")
                                      or "float32", keras_home=fc.get("keras_home") or "", gem_p=gem_p(fc))
    except PipelineError as e:
        raise PipelineError(f"{where}: cannot rebuild its {spec.name} extractor: {e}") from None
    if identity:
        sha = backbones.weights_digest(base)
        if sha != recorded.get("sha256"):
            raise PipelineError(f"{where}: the rebuilt {spec.name} extractor has other weights (sha256 {sha[:12]}) "
                                f"than the cache was made with ({str(recorded.get('sha256'))[:12]}): WEIGHTS="
                                f"{weights} changed since; rerun make features and retrain the head")
        if identity.get("size") not in (None, size) or identity.get("pooling") not in (None, fc["pooling"]):
            raise PipelineError(f"{where}: the cache's record disagrees with its options (size, pooling)")
    return spec, size, model, base


def openvino_features(fc: dict, identity: dict | None, cache_path: str, where: str, log=print):
    """(spec, size, features call) of a cache made with RUNTIME=openvino: its extractor's OpenVINO model, stored
    in the cache's folder (:mod:`pipeline.backbones.openvino_store`; TensorFlow then not imported), compiled with
    the cache's precision hint: the features the cache holds. Without a stored model the extractor is rebuilt
    (its weights digest checked against the cache's), converted and stored; without the cache's identity it is
    rebuilt from the head record's options and converted."""
    runtime.check("openvino")
    spec = backbones.get(fc["backbone"])
    size = backbones.resolve_size(spec, fc.get("size"))
    precision = fc.get("precision") or "float32"

    def build():
        return rebuild_extractor(fc, identity, where, precision="float32")[2]  # OpenVINO's precision, not Keras'

    try:
        if identity is None:
            call = runtime.prepare(build(), size, "openvino", precision, fold=bool(fc.get("fold_batchnorm", True)))
        else:
            call = runtime.stored_call(os.path.dirname(os.path.abspath(cache_path)), identity, size, precision, build,
                                       log)
    except PipelineError as e:
        if str(e).startswith(where):
            raise
        raise PipelineError(f"{where}: its OpenVINO features cannot be computed here: {e}") from None
    return spec, size, call


@dataclass
class Features:
    """What computes a head's features from pixels: the backbone ``spec`` at ``size``, ``call`` (uint8 pixels ->
    features), ``dim``; with TensorFlow the Keras ``extractor`` and its ``base`` (None on an OpenVINO cache)."""

    spec: object
    size: int
    dim: int
    call: object = None
    extractor: object = None
    base: object = None


def head_features(fc, identity, rec, rec_path, log, fold) -> Features:
    """The :class:`Features` of a head record: the cache's stored OpenVINO model on a RUNTIME=openvino cache
    (for a dense head too), else the Keras extractor rebuilt and checked (traced when first called)."""
    if fc.get("runtime") == "openvino":  # the features as the cache holds them
        spec, size, call = openvino_features(fc, identity, rec.get("cache_path") or "", rec_path, log)
        return Features(spec, size, call.dim, call)
    spec, size, model, base = rebuild_extractor(fc, identity, rec_path)  # imports TensorFlow, quietly
    from pipeline.backbones.extractor import compiled_call

    return Features(spec, size, int(model.output_shape[-1]), compiled_call(model, size, fold=fold), model, base)


def classes_of(rec: dict, rec_path: str) -> list:
    """The class names of a head record's ``classes``, in the head's column order."""
    names = rec.get("class_names") or []
    try:
        return [names[int(c)] for c in rec["classes"]]
    except (IndexError, TypeError, ValueError, KeyError):
        raise PipelineError(f"{rec_path}: its classes and class names disagree; retrain with make head") from None


def open_head(rec_path, log, fold) -> Runner:
    """The :class:`Runner` of a head record, after its record and file check out (:func:`artifacts.check`)."""
    rec, _ = artifacts.check(rec_path)  # the file's sha256 and the versions, before anything is built or unpickled
    if ensemble.is_ensemble(str((rec.get("config") or {}).get("backbone") or "")):
        from pipeline.serve.open_ensemble import open_ensemble  # imports this module

        return open_ensemble(rec_path, rec, log, fold)
    classes = classes_of(rec, rec_path)
    fc, identity, note = cache_config(rec, rec_path)
    fold = bool(fc.get("fold_batchnorm", True)) and fold
    feats = head_features(fc, identity, rec, rec_path, log, fold)
    est, rec = artifacts.load(rec_path, expect_key=rec.get("cache_key"))
    wants = int(getattr(est, "n_features_in_", feats.dim))
    if wants != feats.dim:
        raise PipelineError(f"{rec_path}: takes {wants} features, its {feats.spec.name} extractor gives {feats.dim}; "
                            "retrain it with make head")
    openvino = feats.extractor is None
    src = {"name": rec.get("name"), "head": rec.get("head"), "backbone": feats.spec.name,
           "cache_path": rec.get("cache_path"), "cache_key": rec.get("cache_key"), "features": fc,
           "identity": identity, "sha256": rec["sha256"],
           "runtime": "openvino" if openvino else "tensorflow"}  # what computes the features
    kind = "dense" if rec["kind"] == "keras" else "sklearn"
    float32 = (fc.get("precision") or "float32") == "float32"

    built = None
    if kind == "dense" and not openvino:  # one Keras model end to end
        from pipeline.backbones.extractor import compiled_call
        from pipeline.serve import keras_form

        built = keras_form.head_model(est, rec, kind, feats.spec, feats.size, feats.base, fc["pooling"],
                                      gem_p(fc))
        call, output = compiled_call(built, feats.size, fold=fold), "probability"
    else:
        dtype = fc.get("dtype") or "float32"

        def call(pixels):
            return registry.scores(est, np.asarray(feats.call(pixels)).astype(dtype))  # as stored in the cache

        output = "probability" if hasattr(est, "predict_proba") else "score"

    def keras_model():  # what export exports: float32 (the weights are float32)
        from pipeline.serve import keras_form

        if built is not None and float32:
            return built
        base = feats.base if feats.base is not None and float32 else \
            rebuild_extractor(fc, identity, rec_path, precision="float32")[3]
        return keras_form.head_model(est, rec, kind, feats.spec, feats.size, base, fc["pooling"], gem_p(fc))

    return Runner(rec_path, rec, kind, classes, feats.size, fc.get("interpolation") or "bilinear", output, call,
                  notes=[note] if note else [], keras_model=keras_model, source=src,
                  max_pixels=int(fc.get("max_pixels") or images.MAX_PIXELS))


