"""Shard files: a cache made in pieces (``ENGINE=ray``) writes rows [start, stop) of one split to a file of its
own under ``<stem>.shards/``, keyed by the cache's key and its row range; :func:`read_shard` reads one back
only after verifying it was made for this cache, range and manifest, complete and unchanged."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import h5py
import numpy as np

from pipeline import records
from pipeline.cache import store
from pipeline.cache.groups import HASHES
from pipeline.errors import PipelineError

SHARDS = ".shards"  # <stem>.shards/: the shard files of a cache being made


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one split."""

    split: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.start:09d}-{self.stop:09d}"


def shards(splits, rows) -> list[Shard]:
    """The shards of the layout ``splits`` ({group: item of each row}) of ``rows`` rows each (the last
    shorter): every group of the cache, the views and TTA groups too."""
    return [Shard(s, a, min(a + rows, len(idx))) for s, idx in splits.items() for a in range(0, len(idx), rows)]


def shard_rows(cfg, chunk) -> int:
    """SHARD rounded up to a multiple of the chunk (a multiple of BATCH)."""
    if cfg.shard < 1:
        raise PipelineError(f"SHARD={cfg.shard}: must be at least 1 (rows per shard, rounded up to CHUNK)")
    return math.ceil(cfg.shard / chunk) * chunk


def shard_key(key, sh: Shard) -> str:
    return records.digest({"cache": key, "split": sh.split, "start": sh.start, "stop": sh.stop})


def _damaged(path, why) -> PipelineError:
    return PipelineError(f"shard {path} is {why}: delete it and rerun make features (only that shard is "
                         "extracted again)")


def read_shard(path, key, sh: Shard, layout, dim, rows=True):
    """(features, skipped) of a finished shard file, verified: made for this cache and range (key), every
    row written, checksum, the layout's paths, labels and content hashes; ``rows=False`` checks its record
    only (None). Anything else is a one-line error naming the file."""
    labels, paths, columns = layout[sh.split]
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != store.FORMAT or f.attrs.get("key") != shard_key(key, sh):
                raise _damaged(path, "made for another cache or row range")
            g, n = f[sh.split], sh.stop - sh.start
            if int(g.attrs["done"]) != n or g["features"].shape != (n, dim):
                raise _damaged(path, f"incomplete ({int(g.attrs['done'])} of {n} rows)")
            if not rows:
                return None
            feats, mask = g["features"][()], g["skipped"][()]
            if hashlib.sha256(np.ascontiguousarray(feats).tobytes()).hexdigest() != g.attrs.get("sha256"):
                raise _damaged(path, "changed since it was written (checksum mismatch)")
            same = (list(g["paths"].asstr()[()]) == list(paths[sh.start:sh.stop])
                    and g["labels"][()].tolist() == list(labels[sh.start:sh.stop])
                    and g[HASHES][()].tolist() == columns[HASHES][sh.start:sh.stop].tolist())
            if not same:
                raise _damaged(path, "of other images than the manifest's")
            return feats, mask
    except PipelineError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise _damaged(path, f"damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
