"""The steps of ``python -m pipeline``, as data: each binds a config dataclass (:mod:`pipeline.configs`) to the
function that runs it, named by module so that nothing heavy is imported before a step runs.
Each step's module is imported lazily, when the step runs: ``--help`` and the listings stay light."""

from __future__ import annotations

import dataclasses
import importlib

from pipeline.configs import AuditConfig, BenchConfig, ExportConfig, FeaturesConfig, FinetuneConfig, HeadConfig, PredictConfig


@dataclasses.dataclass(frozen=True)
class Step:
    help: str
    config: type | None
    run: str  # "module:function", called as function(cfg, extra) -> exit status or None
    extra: str = ""  # what free NAME=value options mean for this step ("" = none allowed)
    positional: str = ""  # config field (str) that bare arguments are added to, shell-quoted ("" = none)
    tensorflow: bool = True  # import TensorFlow (quietly) first; steps that may not need it import it themselves

    def load(self):
        module, _, func = self.run.partition(":")
        return getattr(importlib.import_module(module), func)


def features(cfg, extra):
    from pipeline.cache import extract

    extract.run(cfg)


def cache_listing(cfg, extra):
    from pipeline.cache import store
    from pipeline.tables import table

    rows = store.listing(cfg.cache_dir)
    if not rows:
        print(f"{cfg.cache_dir}: empty; run make features")
        return
    out = []
    for r in rows:
        if "key" not in r:
            out.append((r["file"], "", "", "", "", "", "", "", r["status"]))
            continue
        counts = " ".join(f"{s}={c}" for s, c in r["counts"].items())
        weights = r["weights"] if r["weights"] in ("imagenet", "none") else "file"
        out.append((r["key"], str(r["source"]).rstrip("/").rsplit("/", 1)[-1], r["backbone"], weights,
                    str(r["size"]), r["pooling"], counts, r["date"] or "-", r["status"]))
    print(table(("key", "source", "backbone", "weights", "size", "pool", "counts", "date", "status"), out,
                align="<" * 9))


def backbone_listing(cfg, extra):
    from pipeline.backbones.registry import BACKBONES
    from pipeline.tables import table

    print(table(("name", "preprocessing", "size", "min", "features", "alpha"),
                [(b.name, b.preprocess, b.default_size, b.min_size, b.features, b.alpha if b.alpha is not None else "-")
                 for b in BACKBONES.values()], align="<<>>><"))


def head_listing(cfg, extra):
    from pipeline.heads import registry

    print(registry.list_heads())


STEPS = {
    "features": Step("extract frozen-backbone features of a dataset into the HDF5 cache", FeaturesConfig,
                     "pipeline.steps:features", tensorflow=False),  # imported when the backbone is built
    "cache": Step("list what the cache holds (key, source, backbone, size, counts, date)", FeaturesConfig,
                  "pipeline.steps:cache_listing", tensorflow=False),
    "backbones": Step("list the backbone registry", None, "pipeline.steps:backbone_listing", tensorflow=False),
    "head": Step("train a head on the feature cache (made first if missing), report it on test, save it",
                 HeadConfig, "pipeline.heads.train:step", tensorflow=False,
                 extra="head hyper-parameters: NAME=value, e.g. C=0.1, HIDDEN=1024,512, CLASS_WEIGHT=balanced "
                       "(see `python -m pipeline heads`)"),
    "sweep": Step("cross-validate every head's regularisation on train+val; leaderboard; save the best "
                  "(BACKBONES=a,b,a+b: every backbone x head in one table)",
                  HeadConfig, "pipeline.heads.leaderboard:step", tensorflow=False,
                  extra="fixed head hyper-parameters: NAME=value, applied to every swept head that has it "
                        "(e.g. EPOCHS=30; one named in a head's grid replaces that grid)"),
    "heads": Step("list the head registry with hyper-parameters, defaults and sweep grids", None,
                  "pipeline.steps:head_listing", tensorflow=False),
    "audit": Step("look at the data through the cache (made first if missing): label issues, duplicates and leaks, "
                  "outliers, class balance, calibration, unknown-image rejection; one HTML page",
                  AuditConfig, "pipeline.reports.audit.step:step", tensorflow=False),  # only to make a cache
    "bench": Step("measure speed, memory and accuracy side by side; table + reports/bench-<date>.json/.md",
                  BenchConfig, "pipeline.bench:step"),
    "finetune": Step("fine-tune end to end: augmentation -> backbone (top unfrozen, BatchNorm frozen) -> the "
                     "cached dense head; report head only vs fine-tuned on test; export one .keras file",
                     FinetuneConfig, "pipeline.finetune:step",
                     extra="dense head hyper-parameters: NAME=value as for `head` (e.g. HIDDEN=256); a saved "
                           "dense head with other ones is retrained first"),
    "predict": Step("label image files and folders with the fine-tuned model, any saved head or an export "
                    "(top-k probabilities)", PredictConfig, "pipeline.serve.predict:run", positional="images",
                    tensorflow=False),  # imported by the model that needs it (pipeline.serve)
    "export": Step("export the fine-tuned model or a dense/linear head end to end (keras, tf_saved_model, onnx, "
                   "litert, openvino), verified with its own runtime before it is reported done",
                   ExportConfig, "pipeline.serve.export:step"),
}
