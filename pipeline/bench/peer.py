"""``peer``: the plain Keras way as a whole command — ``keras.utils.image_dataset_from_directory`` + the same
extractor model's ``predict`` + ``np.save`` (:data:`SCRIPT`, written into the work folder) — against
``python -m pipeline features`` on the same N images: a first run (fresh cache folder, validation included),
then a run with the cache folder's memos warm (a fresh folder holding the first run's memos, not its cache)."""

from __future__ import annotations

import glob
import os
import sys

import h5py
import numpy as np

from pipeline import memo
from pipeline.bench import common
from pipeline.bench.common import features_args, features_config
from pipeline.bench.report import stat
from pipeline.errors import PipelineError

# The guide's way, nothing of the pipeline's but the model (the same extractor: preprocessing inside, pooled).
SCRIPT = '''"""Features the plain Keras way: image_dataset_from_directory + Model.predict + np.save."""
import sys

data, size, out, backbone, weights, alpha, pooling, batch, seed = sys.argv[1:10]
size, batch = int(size), int(batch)

import keras
import numpy as np

from pipeline.backbones import extractor, registry

model, _ = extractor.build(registry.get(backbone), size, weights, pooling, alpha=float(alpha) or None,
                           seed=int(seed))
ds = keras.utils.image_dataset_from_directory(data, image_size=(size, size), batch_size=batch, shuffle=False)
np.save(out, model.predict(ds, verbose=0))
'''


def run_command(argv, log_path) -> dict:
    """Wall time and peak RSS (MiB) of a whole command (:func:`common.run_command`)."""
    return common.run_command(argv, log_path, os.path.basename(argv[1]))


def _rows(path) -> int:

    with h5py.File(path, "r") as f:
        return int(f["train"]["features"].shape[0])


def run(ctx):
    cfg, imgs = ctx.cfg, ctx.images()
    script = os.path.join(ctx.work, "peer_keras.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    out = {"peer": [], "cold": [], "warm": []}
    for k in range(cfg.repeats):
        npy = os.path.join(ctx.work, f"peer-{k}.npy")
        out["peer"].append(run_command([sys.executable, script, imgs.root, str(ctx.size), npy, cfg.backbone,
                                        cfg.weights, str(cfg.alpha), cfg.pooling, str(cfg.batch), str(cfg.seed)],
                                       os.path.join(ctx.work, f"peer-{k}.log")))
        if np.load(npy).shape[0] != imgs.n:
            raise PipelineError(f"the Keras script saved {np.load(npy).shape[0]} rows, not {imgs.n}")
        cold = os.path.join(ctx.work, f"peer-cold-{k}")  # nothing in it: the images are validated too
        os.makedirs(cold)
        fcfg = features_config(cfg, data=imgs.root, cache_dir=cold, val_fraction=0.0, test_fraction=0.0,
                               per_class=0)
        out["cold"].append(run_command([sys.executable, "-m", "pipeline", "features", *features_args(fcfg)],
                                       os.path.join(ctx.work, f"peer-cold-{k}.log")))
        warm = os.path.join(ctx.work, f"peer-warm-{k}")  # the first run's memos, not its cache
        os.makedirs(warm)
        memo.copy(os.path.join(cold, memo.NAME), os.path.join(warm, memo.NAME))
        wcfg = features_config(cfg, data=imgs.root, cache_dir=warm, val_fraction=0.0, test_fraction=0.0,
                               per_class=0)
        out["warm"].append(run_command([sys.executable, "-m", "pipeline", "features", *features_args(wcfg)],
                                       os.path.join(ctx.work, f"peer-warm-{k}.log")))
        made = [glob.glob(os.path.join(d, "*.h5")) for d in (cold, warm)]
        if any(len(m) != 1 or _rows(m[0]) != imgs.n for m in made):
            raise PipelineError("a features run did not write one cache of every image")
    secs = {name: [r["seconds"] for r in runs] for name, runs in out.items()}
    m = {f"{name}_s": stat(v, "s") for name, v in secs.items()}
    m.update({f"{name}_rss": stat([r["rss_mib"] for r in runs], "MiB") for name, runs in out.items()})
    for name in ("cold", "warm"):
        m[f"{name}_ratio"] = m["peer_s"]["median"] / m[f"{name}_s"]["median"]
        m[f"{name}_paired"] = stat([p / c for p, c in zip(secs["peer"], secs[name])], "x")
    m["images"] = imgs.n
    return {"metrics": m,
            "show": [(f"Keras way: image_dataset_from_directory + predict + np.save, {imgs.n} images",
                      "peer_s"),
                     ("python -m pipeline features, first run (fresh cache folder)", "cold_s"),
                     ("python -m pipeline features, memos warm (fresh cache file)", "warm_s"),
                     ("ratio Keras way / features, first run", "cold_ratio"),
                     ("same, per repeat", "cold_paired"),
                     ("ratio Keras way / features, memos warm", "warm_ratio"),
                     ("same, per repeat", "warm_paired"),
                     ("peak RSS, Keras way", "peer_rss"),
                     ("peak RSS, features (first run)", "cold_rss")],
            "note": "whole commands (Python and TensorFlow start-up included), each repeat the Keras script, a "
                    "features run into an empty cache folder (scan, content hashes, header checks, decode "
                    "check, extraction, HDF5, verify), then one into a fresh folder holding the first run's "
                    "memos (checked images, weights digest) but no cache; the script builds the same "
                    "extractor (pipeline.backbones.extractor.build: preprocessing inside, pooled) in float32 "
                    "with TensorFlow, resizes with tf.image (the pipeline with Pillow) and batches by BATCH"}
