"""The steps of ``python -m pipeline``: each binds a config dataclass to the function that runs it."""

from __future__ import annotations

import os

from pipeline.cli import Step
from pipeline.config import FeaturesConfig


def _features(cfg, extra):
    from pipeline import features

    features.run(cfg)


def _cache(cfg, extra):
    from pipeline import store

    rows = store.listing(cfg.cache_dir)
    if not rows:
        print(f"{cfg.cache_dir}: empty; run make features")
        return
    table = []
    for r in rows:
        if "key" not in r:
            table.append((r["file"], "", "", "", "", "", "", "", r["status"]))
            continue
        counts = " ".join(f"{s}={c}" for s, c in r["counts"].items())
        weights = r["weights"] if r["weights"] in ("imagenet", "none") else "file"
        table.append((r["key"], os.path.basename(str(r["source"]).rstrip("/")), r["backbone"], weights,
                      str(r["size"]), r["pooling"], counts, r["date"] or "-", r["status"]))
    names = ("key", "source", "backbone", "weights", "size", "pool", "counts", "date", "status")
    widths = [max(len(str(row[i])) for row in [names, *table]) for i in range(len(names))]
    for row in [names, *table]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def _backbones(cfg, extra):
    from pipeline.backbones import BACKBONES

    print(f"{'name':<22}{'preprocessing':<14}{'size':>5}{'min':>5}{'features':>9}  alpha")
    for b in BACKBONES.values():
        print(f"{b.name:<22}{b.preprocess:<14}{b.default_size:>5}{b.min_size:>5}{b.features:>9}  "
              f"{b.alpha if b.alpha is not None else '-'}")


def _head(cfg, extra):
    from pipeline import headstep

    headstep.run_head(cfg, extra)


def _sweep(cfg, extra):
    from pipeline import headstep

    headstep.sweep(cfg, extra)


def _heads(cfg, extra):
    from pipeline import headstep

    print(headstep.list_heads())


def _head_config():
    from pipeline.headstep import HeadConfig

    return HeadConfig


STEPS = {
    "features": Step("extract frozen-backbone features of a dataset into the HDF5 cache", FeaturesConfig,
                     _features),
    "cache": Step("list what the cache holds (key, source, backbone, size, counts, date)", FeaturesConfig,
                  _cache),
    "backbones": Step("list the backbone registry", None, _backbones),
    "head": Step("train a head on the feature cache (made first if missing), report it on test, save it",
                 _head_config(), _head,
                 extra="head hyper-parameters: NAME=value, e.g. C=0.1, HIDDEN=1024,512, CLASS_WEIGHT=balanced "
                       "(see `python -m pipeline heads`)"),
    "sweep": Step("cross-validate every head's regularisation on train+val; leaderboard; save the best",
                  _head_config(), _sweep,
                  extra="fixed head hyper-parameters: NAME=value, applied to every swept head that has it "
                        "(e.g. EPOCHS=30; one named in a head's grid replaces that grid)"),
    "heads": Step("list the head registry with hyper-parameters, defaults and sweep grids", None, _heads),
}


def _bench(cfg, extra):
    from pipeline import bench

    bench.run(cfg)


def _bench_config():
    from pipeline.bench import BenchConfig

    return BenchConfig


STEPS["bench"] = Step("measure speed, memory and accuracy side by side; table + reports/bench-<date>.json/.md",
                      _bench_config(), _bench)


def _finetune(cfg, extra):
    from pipeline import finetune

    finetune.run(cfg, extra)


def _predict(cfg, extra):
    from pipeline import predict

    return predict.run(cfg)


def _finetune_config():
    from pipeline.finetune import FinetuneConfig

    return FinetuneConfig


def _predict_config():
    from pipeline.predict import PredictConfig

    return PredictConfig


STEPS["finetune"] = Step("fine-tune end to end: augmentation -> backbone (top unfrozen, BatchNorm frozen) -> the "
                         "cached dense head; report head only vs fine-tuned on test; export one .keras file",
                         _finetune_config(), _finetune,
                         extra="dense head hyper-parameters: NAME=value as for `head` (e.g. HIDDEN=256); a saved "
                               "dense head with other ones is retrained first")
STEPS["predict"] = Step("label image files and folders with the exported fine-tuned model (top-k probabilities)",
                        _predict_config(), _predict, positional="images")
