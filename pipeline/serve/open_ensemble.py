"""A head on a feature ensemble (``BACKBONE=a+b``, :mod:`pipeline.cache.ensemble`) as a runner.

Predict decodes each image once per member size, as each member's cache was made, and computes every member's
features as its cache holds them: its extractor rebuilt from its cache's record and checked against it by
weights digest (:func:`pipeline.serve.open_head.rebuild_extractor`; a RUNTIME=openvino member through its stored
OpenVINO model); the rows are then joined in NumPy exactly as for training (:func:`pipeline.cache.ensemble.
apply`) and scored by the head, any head: on a cache's own images, the head's predictions on the joined cache.

The standardisation is the one the head step saved in the head's record (its sha256 checked), not recomputed:
predict then reads only the member caches' headers, not all their rows, and uses the very statistics the head
was fitted after. The member caches must still be there (their keys checked against the record's, which make
up the head's cache key): they hold each extractor's identity.

Export exports :func:`pipeline.serve.keras_form.ensemble_model`: one multi-branch Keras model whose input is
the largest member size, each other branch resizing inside the graph (so its features are close to, not
equal to, the cache's, which decoded every size from the file).

Keras is imported lazily, as in :mod:`pipeline.serve.open_head`, where a model needs it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pipeline.cache import ensemble, resolve, store
from pipeline.configs import FeaturesConfig, HeadConfig, asdict, fields
from pipeline.data import images
from pipeline.errors import PipelineError
from pipeline.heads import artifacts, registry
from pipeline.serve.open_head import Features, classes_of, gem_p, head_features, rebuild_extractor
from pipeline.serve.runner import Runner


@dataclass
class Member:
    """One member of an ensemble head: ``label`` (``name@size``), its cache ``path`` and ``key``, the features
    options ``fc`` and ``identity`` of its cache's record."""

    label: str
    path: str
    key: str
    fc: dict
    identity: dict | None


def _make_command(rec: dict, index: int) -> str:
    """The ``make features`` command of member ``index`` of the head's options (best effort)."""
    config = {k: v for k, v in (rec.get("config") or {}).items() if k in fields(HeadConfig)}
    try:
        member = ensemble.member_configs(HeadConfig(**config))[index]
        return resolve.features_command(resolve.features_config(member))
    except (PipelineError, TypeError, IndexError):
        return f"make features with the head's options and BACKBONE={(rec.get('config') or {}).get('backbone')}"


def members(rec: dict, rec_path: str) -> tuple[list[Member], str, dict | None]:
    """(members, normalisation, standardisation) of an ensemble head's record, each member's cache header
    checked against the key the record gives (together they must make the head's cache key)."""
    ens = rec.get("ensemble")
    if not isinstance(ens, dict) or not ens.get("members"):
        raise PipelineError(f"{rec_path}: this ensemble head's record has no members and standardisation (saved "
                            "by an older version); retrain it with make head")
    norm = ens.get("normalisation")
    if ensemble.key_of([m.get("key") for m in ens["members"]], norm) != rec.get("cache_key"):
        raise PipelineError(f"{rec_path}: its ensemble members do not make the cache key it was trained on; "
                            "retrain it with make head")
    stats = ensemble.decode_stats(ens.get("standardisation"), rec_path)
    if norm != "concat" and stats is None:
        raise PipelineError(f"{rec_path}: its {norm} ensemble has no standardisation; retrain it with make head")
    out = []
    for i, m in enumerate(ens["members"]):
        label, path = m.get("label") or m.get("backbone"), m.get("path") or ""
        if not os.path.exists(path):
            raise PipelineError(f"{rec_path}: the cache of its ensemble member {label}, {path}, is gone; make it "
                                f"again with: {_make_command(rec, i)}")
        try:
            cfg = store.check_header(path, expect_key=m.get("key"))["config"]
        except PipelineError as e:
            raise PipelineError(f"{rec_path}: its ensemble member {label}'s cache cannot be used ({e}); make it "
                                f"again with: {_make_command(rec, i)}, then retrain the head") from None
        out.append(Member(label, path, m.get("key"), {**asdict(FeaturesConfig()), **cfg}, cfg.get("identity")))
    return out, norm, stats


def _features(ms: list[Member], rec_path, log, fold) -> list[Features]:
    return [head_features(m.fc, m.identity, {"cache_path": m.path}, f"{rec_path}: member {m.label}", log,
                          bool(m.fc.get("fold_batchnorm", True)) and fold) for m in ms]


def open_ensemble(rec_path, rec, log, fold) -> Runner:
    """The :class:`Runner` of a head on a feature ensemble (record ``rec`` already checked by
    :func:`pipeline.heads.artifacts.check`): see the module's doc."""
    classes = classes_of(rec, rec_path)
    ms, norm, stats = members(rec, rec_path)
    feats = _features(ms, rec_path, log, fold)
    est, rec = artifacts.load(rec_path, expect_key=rec.get("cache_key"))
    dim = sum(f.dim for f in feats)
    wants = int(getattr(est, "n_features_in_", dim))
    if wants != dim:
        raise PipelineError(f"{rec_path}: takes {wants} features, its members' extractors give {dim} "
                            f"({' + '.join(str(f.dim) for f in feats)}); retrain it with make head")
    dtypes = [m.fc.get("dtype") or "float32" for m in ms]

    def call(pixels):  # one batch per member, at its size (Runner.sizes)
        batches = pixels if isinstance(pixels, (list, tuple)) else [pixels] * len(ms)
        blocks = [np.asarray(f.call(p)).astype(t) for f, p, t in zip(feats, batches, dtypes)]  # as cached
        return registry.scores(est, ensemble.apply(blocks, norm, stats))

    kind = "dense" if rec["kind"] == "keras" else "sklearn"
    first = ms[0]
    src = {"name": rec.get("name"), "head": rec.get("head"), "backbone": rec["config"]["backbone"],
           "cache_path": first.path, "cache_key": first.key,  # the images: every member's are the same
           "features": first.fc, "identity": first.identity, "sha256": rec["sha256"],
           "ensemble": {"members": [m.label for m in ms], "cache_key": rec.get("cache_key"), "normalisation": norm},
           "runtime": "openvino" if any(f.extractor is None for f in feats) else "tensorflow"}

    def keras_model():
        return ensemble_keras_model(est, rec, kind, ms, feats, norm, stats, rec_path)

    return Runner(rec_path, rec, kind, classes, max(f.size for f in feats),
                  first.fc.get("interpolation") or "bilinear",
                  "probability" if hasattr(est, "predict_proba") else "score", call, keras_model=keras_model,
                  source=src, max_pixels=int(first.fc.get("max_pixels") or images.MAX_PIXELS),
                  sizes=tuple(f.size for f in feats))


def ensemble_keras_model(est, rec, kind, ms, feats, norm, stats, where):
    """The multi-branch float32 Keras model of an ensemble head (what export exports), its input the largest
    member size: each member's base (rebuilt in float32 where predict's is not), pooling and L2 row norm, the
    standardisation folded into the head's first Dense layer."""
    from pipeline.serve import keras_form  # imports Keras

    branches = []
    for m, f in zip(ms, feats):
        float32 = (m.fc.get("precision") or "float32") == "float32"
        base = f.base if f.base is not None and float32 else \
            rebuild_extractor(m.fc, m.identity, f"{where}: member {m.label}", precision="float32")[3]
        branches.append((f.spec, f.size, base, m.fc["pooling"], gem_p(m.fc)))
    head = keras_form.standardised_dense(est.model_, stats) if kind == "dense" else \
        keras_form.linear_head(est, rec, stats)
    size = max(f.size for f in feats)
    return keras_form.ensemble_model(branches, head, size, ms[0].fc.get("interpolation") or "bilinear",
                                     l2=norm != "concat", name="ensemble")
