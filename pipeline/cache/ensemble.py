"""Feature ensembles: ``BACKBONE=efficientnet_lite0+efficientnet_lite2`` or
``efficientnet_lite0@288+efficientnet_lite0@224`` (members ``name[@size]``; every other features option is
each member's). Each member's cache is made or reused on its own by the ``features`` step; this module only
reads them: rows are matched by image content (each cache's per-row ``content_sha256``), never by position,
and each member's features are L2-normalised per row, concatenated, then standardised with the train split's
mean and spread. The result is a :class:`pipeline.cache.store.Cache` as heads use it, held in memory."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from dataclasses import dataclass

import h5py
import numpy as np

from pipeline import records
from pipeline.backbones import registry
from pipeline.cache import reuse, store
from pipeline.configs import replace
from pipeline.errors import PipelineError, choose

SEP, AT = "+", "@"
NORMS = ("l2_standardise", "concat")  # measured on flowers5: docs/ensembles.md
EPS = 1e-12
SUFFIX = ".ensemble"  # the in-memory cache's name: no file of this name is written


@dataclass
class EnsembleCache(store.Cache):
    """The joined cache: ``hashes`` {split: content sha256 of every row}; ``members`` the member cache paths;
    ``stats`` the standardisation (:func:`standardisation`)."""

    hashes: dict = None
    members: list = None
    stats: dict = None


def is_ensemble(backbone: str) -> bool:
    return SEP in (backbone or "")


def parse(backbone: str) -> list[tuple[str, int]]:
    """[(backbone name, size or 0 for SIZE)] of ``BACKBONE=name[@size]+name[@size]...``; bad syntax, an unknown
    name or a member given twice is one line."""
    members = []
    for part in backbone.split(SEP):
        name, at, size = part.strip().partition(AT)
        if not name:
            raise PipelineError(f"BACKBONE={backbone}: an empty member; write name[@size]+name[@size], e.g. "
                                "efficientnet_lite0+efficientnet_lite2 or efficientnet_lite0@288+efficientnet_lite0")
        if at and not (size.isdigit() and int(size) > 0):
            raise PipelineError(f"BACKBONE={backbone}: member {part.strip()!r}: after @ comes the input size in "
                                "pixels, e.g. efficientnet_lite0@288")
        registry.get(name)  # an unknown name lists the valid ones
        members.append((name, int(size) if at else 0))
    if len(set(members)) != len(members):
        raise PipelineError(f"BACKBONE={backbone}: a member is named twice; give each its own name or @size")
    return members


def member_configs(cfg) -> list:
    """The features (or head) config of each member of ``cfg.backbone``: its backbone and size, every other
    option as given (a member without @size takes SIZE)."""
    if cfg.views or cfg.tta:
        raise PipelineError(f"BACKBONE={cfg.backbone}: VIEWS and TTA rows are not joined across ensemble members; "
                            "leave VIEWS=0 and TTA=0 for an ensemble")
    return [replace(cfg, backbone=name, size=size or cfg.size) for name, size in parse(cfg.backbone)]


def hashes(cache, label) -> dict:
    """{split: content sha256 of every row} of a member cache as its file stores them (rows that did not
    decode left out, as :func:`store.load` does); a cache without the column is one line naming the member."""
    out = {}
    with h5py.File(cache.path, "r") as f:
        for s in cache.splits:
            g = f[s]
            if reuse.HASHES not in g:
                raise PipelineError(f"ensemble member {label}: {cache.path} has no image content hashes (made by an "
                                    "older version); delete it and rerun, so that its rows can be matched")
            keep = ~g["skipped"][()] if "skipped" in g else np.ones(g["labels"].shape[0], bool)
            out[s] = g[reuse.HASHES][()][keep].astype(str)
    return out


def _label(cache) -> str:
    ident = cache.config.get("identity") or {}
    return f"{ident.get('backbone', cache.config.get('backbone'))}@{ident.get('size', cache.config.get('size'))}"


def _aligned(caches, labels, sums) -> dict:
    """{split: [each member's features in the first member's row order]}, rows matched by content hash; a
    member that lacks an image of the first, or holds one it lacks, is one line naming the member."""
    first = caches[0]
    out = {}
    for s, sp in first.splits.items():
        order = sums[0][s]
        blocks = [sp.features]
        for c, label, h in zip(caches[1:], labels[1:], sums[1:]):
            where = dict(zip(h.get(s, ()), range(len(h.get(s, ())))))
            missing = [k for k, sha in enumerate(order) if sha not in where]
            extra = len(set(where) - set(order))
            if missing or extra:
                example = f", e.g. {sp.paths[missing[0]]}" if missing else ""
                raise PipelineError(f"ensemble member {label} ({c.path}) does not cover the same images as "
                                    f"{labels[0]}: {len(missing)} {s} image(s) missing{example}, {extra} more; make "
                                    "every member from the same DATA, SEED, VAL_FRACTION, TEST_FRACTION, PER_CLASS")
            blocks.append(c.splits[s].features[[where[sha] for sha in order]])
        out[s] = blocks
    return out


def l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)


def apply(blocks: list, norm: str, stats: dict | None) -> np.ndarray:
    """One split's joined features from its members' ``blocks`` (features as their caches store them):
    concatenated (``concat``), or each L2-normalised per row, concatenated and standardised with ``stats``
    (``{"mean", "std"}``, the train split's); what a head on the ensemble sees, in training and in predict."""
    if norm == "concat":
        return np.concatenate(blocks, axis=1).astype(np.float32)
    joined = np.concatenate([l2_rows(x) for x in blocks], axis=1)
    return ((joined - stats["mean"]) / stats["std"]).astype(np.float32)


def standardisation(blocks: dict, norm: str = "l2_standardise") -> dict | None:
    """``{"mean", "std"}`` of the L2-normalised, concatenated train rows (every split's when there is no train
    split); a column without spread keeps std 1. None for ``concat``."""
    choose(norm, dict.fromkeys(NORMS), "ensemble normalisation")
    if norm == "concat":
        return None
    joined = {s: np.concatenate([l2_rows(x) for x in b], axis=1) for s, b in blocks.items()}
    train = joined["train"] if "train" in joined else np.concatenate(list(joined.values()))
    mean, std = train.mean(axis=0), train.std(axis=0)
    return {"mean": mean, "std": np.where(std > EPS, std, 1.0).astype(std.dtype)}


def normalise(blocks: dict, norm: str = "l2_standardise") -> dict:
    """{split: features}: each member's rows L2-normalised, concatenated, then every column standardised with
    the train split's mean and standard deviation (``norm="concat"``: the members' features as they are)."""
    stats = standardisation(blocks, norm)
    return {s: apply(b, norm, stats) for s, b in blocks.items()}


def encode_stats(stats: dict | None) -> dict | None:
    """The standardisation as a head's record keeps it: little-endian bytes of its dtype (the member caches')
    in base64, and their sha256."""
    if stats is None:
        return None
    dtype = np.dtype(stats["mean"].dtype).newbyteorder("<")
    raw = {k: np.asarray(stats[k], dtype).tobytes() for k in ("mean", "std")}
    return {"dtype": dtype.str, **{k: base64.b64encode(v).decode("ascii") for k, v in raw.items()},
            "sha256": hashlib.sha256(raw["mean"] + raw["std"]).hexdigest()}


def decode_stats(saved: dict | None, where: str) -> dict | None:
    """The ``{"mean", "std"}`` of :func:`encode_stats`' record, its sha256 checked (a changed record is one line)."""
    if saved is None:
        return None
    try:
        raw = {k: base64.b64decode(saved[k]) for k in ("mean", "std")}
        ok = hashlib.sha256(raw["mean"] + raw["std"]).hexdigest() == saved["sha256"]
        dtype = np.dtype(saved["dtype"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise PipelineError(f"{where}: its ensemble standardisation is damaged or changed (sha256 mismatch); "
                            "retrain the head with make head")
    return {k: np.frombuffer(v, dtype).astype(dtype.newbyteorder("=")) for k, v in raw.items()}


def record(cache: EnsembleCache) -> dict:
    """What a head trained on the joined cache records of it (:mod:`pipeline.heads.artifacts`), so that predict
    and export rebuild it without reloading the member caches: each member (its cache's path and key, backbone,
    size, feature dimension), the normalisation and its train statistics (:func:`encode_stats`)."""
    ens = cache.config["ensemble"]
    return {"members": [{**m, "path": os.path.abspath(m["path"])} for m in ens["members"]],
            "normalisation": ens["normalisation"], "standardisation": encode_stats(cache.stats)}


def key_of(member_keys: list, norm: str) -> str:
    """The joined cache's key: a digest of its members' keys and the normalisation."""
    return records.digest({"members": list(member_keys), "normalisation": norm})


def join(paths: list[str], backbone: str, norm: str = "l2_standardise") -> EnsembleCache:
    """The member caches at ``paths`` (in ``BACKBONE``'s order) as one in-memory cache of their joined
    features (see the module's doc); its key is a digest of the members' keys and ``norm``."""
    caches = [store.load(p) for p in paths]
    labels = [_label(c) for c in caches]
    for c, label in zip(caches[1:], labels[1:]):
        if list(c.class_names) != list(caches[0].class_names):
            raise PipelineError(f"ensemble member {label} ({c.path}) has other classes than {labels[0]}: "
                                f"{', '.join(c.class_names)}; make every member from the same DATA")
    sums = [hashes(c, label) for c, label in zip(caches, labels)]
    blocks = _aligned(caches, labels, sums)
    stats = standardisation(blocks, norm)
    feats = {s: apply(b, norm, stats) for s, b in blocks.items()}
    first = caches[0]
    splits = {s: store.Split(feats[s], sp.labels, sp.paths) for s, sp in first.splits.items()}
    members = [{"backbone": (c.config.get("identity") or {}).get("backbone"), "label": label, "path": c.path,
                "size": (c.config.get("identity") or {}).get("size"),
                "key": c.key, "feature_dim": int(c.train.features.shape[1]) if "train" in c.splits else None}
               for c, label in zip(caches, labels)]
    identity = {"ensemble": [c.config.get("identity") for c in caches], "normalisation": norm}
    key = key_of([c.key for c in caches], norm)
    dim = int(next(iter(feats.values())).shape[1])
    config = {**first.config, "backbone": backbone, "identity": identity, "feature_dim": dim,
              "ensemble": {"members": members, "normalisation": norm}}
    ds = os.path.basename(first.path).split(f"_{(first.config.get('identity') or {}).get('backbone')}_")[0]
    name = f"{ds}_{SEP.join(label.replace(AT, '_') for label in labels)}_{key[:12]}{SUFFIX}"
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return EnsembleCache(os.path.join(os.path.dirname(first.path), name), key, config, list(first.class_names),
                         first.versions, created, splits, None, {}, hashes=sums[0], members=[c.path for c in caches], stats=stats)
