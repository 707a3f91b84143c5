"""Heads as runners: a dense head end to end; a scikit-learn head on the features of the extractor of its
cache, rebuilt from the cache's record and checked against it (the weights digest); on a cache made with
RUNTIME=openvino, either head on the features of the cache's stored OpenVINO model; linear heads as a Dense
layer."""

from __future__ import annotations

import os

import numpy as np

from pipeline import records
from pipeline.configs import FeaturesConfig, asdict
from pipeline.data import images
from pipeline.errors import PipelineError
from pipeline.heads import artifacts
from pipeline.serve.runner import LINEAR_HEADS, Runner

# --- heads: the extractor of the cache, rebuilt and checked ----------------------------------------------------

def cache_config(rec: dict, rec_path: str) -> tuple[dict, dict | None, str | None]:
    """(features options, the cache's identity or None, a note or None) of a head record: the cache file's own
    record when the file is there (and is the cache the head was trained on), else the head record's options,
    said so in the note."""
    from pipeline.cache import store

    if "+" in str((rec.get("config") or {}).get("backbone") or ""):
        raise PipelineError(f"{rec_path}: a head on a feature ensemble ({rec['config']['backbone']}) runs on cached "
                            "features only: predict and export of an ensemble are not built yet")
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


def _gem_p(fc: dict) -> float:
    """POOLING=gem's exponent of features options ``fc`` (a cache made before GEM_P existed: the default)."""
    return float(fc.get("gem_p") or FeaturesConfig().gem_p)


def rebuild_extractor(fc: dict, identity: dict | None, where: str, precision: str | None = None):
    """(spec, size, extractor, base) of the features options ``fc``: the extractor of ``make features``, with
    the weights file the cache recorded. With the cache's ``identity`` the weights digest must be the one the
    cache was made with."""
    from pipeline import quiet

    records.use_keras_home(fc.get("keras_home") or "")  # before Keras is imported: Keras reads it once
    quiet.tensorflow()
    from pipeline.backbones import extractor
    from pipeline.backbones import registry as backbones

    spec = backbones.get(fc["backbone"])
    size = backbones.resolve_size(spec, fc.get("size"))
    recorded = (identity or {}).get("weights") or {}
    weights = fc["weights"]
    if recorded.get("source") == "file" and recorded.get("file"):
        weights = recorded["file"]  # the absolute path the cache was made from
    try:
        model, base = extractor.build(spec, size, weights, fc["pooling"], alpha=fc.get("alpha") or None,
                                      seed=int(fc.get("seed") or 0), precision=precision or fc.get("precision")
                                      or "float32", keras_home=fc.get("keras_home") or "", gem_p=_gem_p(fc))
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
    from pipeline.backbones import registry as backbones
    from pipeline.backbones import runtime

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


def open_head(rec_path, log, fold):
    from pipeline.heads import registry

    rec, _ = artifacts.check(rec_path)  # the file's sha256 and the versions, before anything is built or unpickled
    names = rec.get("class_names") or []
    try:
        classes = [names[int(c)] for c in rec["classes"]]
    except (IndexError, TypeError, ValueError, KeyError):
        raise PipelineError(f"{rec_path}: its classes and class names disagree; retrain with make head") from None
    fc, identity, note = cache_config(rec, rec_path)
    openvino = fc.get("runtime") == "openvino"
    if openvino:  # the features as the cache holds them, for a dense head too
        spec, size, features = openvino_features(fc, identity, rec.get("cache_path") or "", rec_path, log)
        base, dim = None, features.dim
    else:
        from pipeline import quiet

        quiet.tensorflow()  # before the extractor module imports Keras, hence TensorFlow
        from pipeline.backbones.extractor import compiled_call

        spec, size, extractor_model, base = rebuild_extractor(fc, identity, rec_path)
        dim = int(extractor_model.output_shape[-1])
    est, rec = artifacts.load(rec_path, expect_key=rec.get("cache_key"))
    wants = int(getattr(est, "n_features_in_", dim))
    if wants != dim:
        raise PipelineError(f"{rec_path}: takes {wants} features, its {spec.name} extractor gives {dim}; "
                            "retrain it with make head")
    fold = bool(fc.get("fold_batchnorm", True)) and fold
    src = {"name": rec.get("name"), "head": rec.get("head"), "backbone": spec.name, "cache_path": rec.get("cache_path"),
           "cache_key": rec.get("cache_key"), "features": fc, "identity": identity, "sha256": rec["sha256"],
           "runtime": "openvino" if openvino else "tensorflow"}  # what computes the features
    common = dict(notes=[note] if note else [], source=src, max_pixels=int(fc.get("max_pixels") or images.MAX_PIXELS))
    interp = fc.get("interpolation") or "bilinear"
    kind = "dense" if rec["kind"] == "keras" else "sklearn"

    def base32():  # what export exports: float32 (the weights are float32)
        if base is not None and (fc.get("precision") or "float32") == "float32":
            return base
        return rebuild_extractor(fc, identity, rec_path, precision="float32")[3]

    if kind == "dense" and not openvino:
        from pipeline.finetune.model import build_model

        model = build_model(spec, size, base, fc["pooling"], est.model_, augment=None, gem_p=_gem_p(fc))

        def keras_model():
            if (fc.get("precision") or "float32") == "float32":
                return model
            return build_model(spec, size, base32(), fc["pooling"], est.model_, augment=None, gem_p=_gem_p(fc))

        return Runner(rec_path, rec, kind, classes, size, interp, "probability",
                      compiled_call(model, size, fold=fold), keras_model=keras_model, **common)
    if not openvino:
        features = compiled_call(extractor_model, size, fold=fold)
    dtype = fc.get("dtype") or "float32"

    def call(pixels):
        return registry.scores(est, np.asarray(features(pixels)).astype(dtype))  # as stored in the cache

    def keras_model():
        if kind == "dense":
            from pipeline.finetune.model import build_model

            return build_model(spec, size, base32(), fc["pooling"], est.model_, augment=None, gem_p=_gem_p(fc))
        return linear_model(est, rec, spec, size, base32(), fc["pooling"], gem_p=_gem_p(fc))

    return Runner(rec_path, rec, kind, classes, size, interp,
                  "probability" if hasattr(est, "predict_proba") else "score", call, keras_model=keras_model, **common)


def linear_model(est, rec, spec, size, base, pooling, gem_p=3.0):
    """A linear scikit-learn head (logreg, linear SVM, with the StandardScaler in front) on the backbone as one
    Keras model: the scaler folded into one Dense layer of the classifier's coefficients, then softmax
    (multinomial logistic regression), sigmoid (binary) or nothing (the SVM's decision values)."""
    import keras
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from pipeline.finetune.model import build_model

    steps = [s for _, s in est.steps] if isinstance(est, Pipeline) else [est]
    clf, front = steps[-1], steps[:-1]
    if not isinstance(clf, (LogisticRegression, LinearSVC)) or any(not isinstance(s, StandardScaler) for s in front):
        raise PipelineError(f"{rec.get('head')} head: only linear heads ({', '.join(LINEAR_HEADS)}) become a Keras "
                            "layer, and dense heads and fine-tuned models export as they are; this one can only "
                            "run with make predict")
    coef = np.asarray(clf.coef_, np.float64)  # (k, d), k = 1 for two classes
    bias = np.asarray(clf.intercept_, np.float64).reshape(-1) * np.ones(coef.shape[0])
    for s in reversed(front):  # x -> (x - mean) / scale, folded into the weights
        scale = np.asarray(s.scale_, np.float64) if s.scale_ is not None else np.ones(coef.shape[1])
        mean = np.asarray(s.mean_, np.float64) if s.mean_ is not None and s.with_mean else np.zeros(coef.shape[1])
        coef = coef / scale
        bias = bias - coef @ mean
    k, d = coef.shape
    act = ("softmax" if k > 1 else "sigmoid") if isinstance(clf, LogisticRegression) else None
    inputs = keras.Input((d,), name="features")
    dense_layer = keras.layers.Dense(k, activation=act, name="head_output")
    head = keras.Model(inputs, dense_layer(inputs), name=f"{rec.get('head')}open_head")
    dense_layer.set_weights([coef.T.astype(np.float32), bias.astype(np.float32)])
    return build_model(spec, size, base, pooling, head, augment=None, gem_p=gem_p)
