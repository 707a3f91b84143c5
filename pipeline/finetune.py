"""``finetune``: the end-to-end model — raw pixels -> augmentation -> the backbone's preprocessing -> backbone
-> the cache's pooling -> the dense head trained on the cache — with the top of the backbone unfrozen.

Phase 1 is the dense head on the feature cache (loaded from ``make head HEAD=dense``, trained first when
missing). Phase 2 trains end to end on the images at a very low learning rate, BatchNorm frozen
(``trainable=False``: in Keras 3 the backbone's ``training=False`` alone does not stop ``fit`` from updating
the moving statistics), early-stopping on val loss from the head-only starting point (fine-tuning never
returns weights worse on val than the cached head), with a checkpoint of the best model and a backup of
the training state that an interrupted run resumes from. The result is evaluated like ``make head`` and
exported as one ``.keras`` file taking raw images (see :mod:`pipeline.predict`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np

from pipeline import artifacts, data, evaluate, headstep, heads, records, store
from pipeline.config import FeaturesConfig, asdict, fields, opt
from pipeline.errors import PipelineError, choose
from pipeline.headstep import HeadConfig

HEAD_NAME = "dense"  # the record of ``make head HEAD=dense`` is the head put on top
NAME = "finetune"  # models/<stem>/finetune.keras + finetune.json, reports/<stem>/finetune/
FLIPS = ("horizontal", "vertical", "horizontal_and_vertical", "none")
OPTIMIZERS = ("adam", "sgd")
UNFREEZE_HELP = ("a layer name or block prefix onwards (block_16, block5_conv1), N (the last N layers), "
                 "a fraction (0.3 of the layers), blocks:N (the last N blocks), all, none")


@dataclass(frozen=True)
class FinetuneConfig(HeadConfig):
    """Options of ``finetune``: the features options select the cache, the head options its dense head (its
    hyper-parameters are free NAME=value options as for ``head``); the rest shape phase 2."""

    head: str = opt(HEAD_NAME, "the cached head put on top: dense (trained on the cache first when missing)")
    unfreeze: str = opt("blocks:2", "backbone layers trained: " + UNFREEZE_HELP)
    finetune_epochs: int = opt(10, "fine-tuning epochs at most (early stopping on val loss)")
    finetune_lr: float = opt(1e-5, "fine-tuning learning rate (very low: pretrained weights move little)")
    optimizer: str = opt("adam", "adam | sgd (with MOMENTUM)")
    momentum: float = opt(0.9, "SGD momentum")
    finetune_patience: int = opt(3, "epochs without val-loss improvement before stopping (best weights kept)")
    flip: str = opt("horizontal", "augmentation: " + " | ".join(FLIPS))
    rotation: float = opt(0.1, "augmentation: random rotation, fraction of a full turn (0 = off)")
    zoom: float = opt(0.1, "augmentation: random zoom in/out, fraction of the size (0 = off)")
    contrast: float = opt(0.1, "augmentation: random contrast factor (0 = off)")
    resume: bool = opt(True, "resume an interrupted fine-tune from its backup (0: start over)")
    verbose: int = opt(1, "Keras progress: 1 = progress bars, 2 = one line per epoch, 0 = off")


# --- unfreeze policies ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unfreeze:
    """A parsed ``UNFREEZE`` value. ``kind``: none | all | layers (last N) | fraction | blocks (last N) |
    name (a layer name or block prefix, and every layer after it)."""

    text: str
    kind: str
    value: object = None


def parse_unfreeze(text) -> Unfreeze:
    """The policy of an ``UNFREEZE`` text; layer and block names are checked later, against the backbone."""
    raw = str(text).strip()
    low = raw.lower()
    if low in ("none", "all"):
        return Unfreeze(raw, low)

    def bad(why):
        return PipelineError(f"UNFREEZE={raw!r}: {why}; valid: {UNFREEZE_HELP}")

    if low.startswith(("blocks:", "layers:")):
        kind, _, n = low.partition(":")
        if not n.isdigit() or int(n) < 1:
            raise bad(f"{kind}:N needs a whole number N >= 1")
        return Unfreeze(raw, kind, int(n))
    if re.fullmatch(r"\d+", low):
        return Unfreeze(raw, "layers", int(low)) if int(low) else Unfreeze(raw, "none")
    if re.fullmatch(r"\d*\.\d+|\d+\.\d*|\d+e-?\d+", low):
        f = float(low)
        if not 0 < f <= 1:
            raise bad("a fraction of the backbone's layers must be in (0, 1]")
        return Unfreeze(raw, "fraction", f)
    if not raw or raw.startswith("-"):
        raise bad("expected a name, a count or a fraction")
    return Unfreeze(raw, "name", raw)


def backbone_layers(base) -> list:
    """The backbone's layers in order, without its input layer: what the policies count."""
    import keras

    return [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]


def block_names(base, spec) -> list[str]:
    """The backbone's block names in order, by the registry's block pattern (``block_1``.. ``Conv_1``)."""
    rx = re.compile(spec.blocks)
    out = []
    for layer in backbone_layers(base):
        m = rx.match(layer.name)
        if m and m.group(0) not in out:
            out.append(m.group(0))
    return out


def _starts_with(name: str, prefix: str) -> bool:
    """``prefix`` names ``name`` or a block/stage it belongs to: ``block5`` -> ``block5_conv1`` and
    ``block5a_expand``, but ``block_1`` does not name ``block_16_expand``."""
    if name == prefix:
        return True
    if not name.startswith(prefix):
        return False
    nxt = name[len(prefix)]
    return nxt == "_" or (prefix[-1].isdigit() and nxt.isalpha())


def first_trainable(base, spec, policy: Unfreeze) -> int:
    """Index (into :func:`backbone_layers`) of the first layer the policy trains; len(layers) for none."""
    layers = backbone_layers(base)
    n = len(layers)
    if policy.kind == "none":
        return n
    if policy.kind == "all":
        return 0
    if policy.kind == "layers":
        return max(0, n - policy.value)
    if policy.kind == "fraction":
        return n - max(1, min(n, round(policy.value * n)))
    blocks = block_names(base, spec)
    if policy.kind == "blocks":
        if policy.value > len(blocks):
            raise PipelineError(f"UNFREEZE={policy.text}: {spec.name} has {len(blocks)} blocks: "
                                f"{', '.join(blocks)}")
        start = blocks[-policy.value]
        rx = re.compile(spec.blocks)
        return next(i for i, layer in enumerate(layers) if (m := rx.match(layer.name)) and m.group(0) == start)
    for i, layer in enumerate(layers):
        if _starts_with(layer.name, policy.value):
            return i
    raise PipelineError(f"UNFREEZE={policy.text!r}: no layer or block of that name in {spec.name}; its blocks: "
                        f"{', '.join(blocks)} (or a layer name, N, a fraction, blocks:N, all, none)")


def _walk(layer):
    yield layer
    for sub in getattr(layer, "layers", []):
        yield from _walk(sub)


def set_trainable(base, value: bool) -> None:
    """``trainable`` on the backbone and explicitly on every layer in it (Keras 3 does not pass an unchanged
    value on to the layers)."""
    base.trainable = value
    for layer in _walk(base):
        layer.trainable = value


def freeze_batchnorm(base) -> int:
    """Set ``trainable=False`` on every BatchNormalization layer (nested ones too): they then run in
    inference mode and ``fit`` never updates their moving statistics. Returns how many there are."""
    import keras

    bns = [layer for layer in _walk(base) if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.trainable = False
    return len(bns)


def apply_unfreeze(base, spec, policy: Unfreeze) -> dict:
    """Set the backbone's ``trainable`` flags for ``policy``, BatchNorm always frozen; what was done.
    Recompile the model afterwards."""
    layers = backbone_layers(base)
    k = first_trainable(base, spec, policy)
    set_trainable(base, k < len(layers))
    for i, layer in enumerate(layers):
        if i < k:
            set_trainable(layer, False)
    n_bn = freeze_batchnorm(base)
    return {"unfreeze": policy.text, "from_layer": layers[k].name if k < len(layers) else None,
            "layers_unfrozen": len(layers) - k, "layers": len(layers), "batchnorm_frozen": n_bn}


def count_params(model) -> dict:
    """Total, trainable and non-trainable parameters of the model as its flags stand."""
    t = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    n = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return {"total": t + n, "trainable": t, "non_trainable": n}


def parameter_table(model, base, spec, policy: Unfreeze) -> list[dict]:
    """Parameter counts of three configurations — everything trainable (Keras' default, BatchNorm
    included), frozen base, the chosen policy — leaving the chosen policy applied."""
    rows = []
    set_trainable(base, True)
    rows.append({"configuration": "everything trainable", **count_params(model)})
    set_trainable(base, False)
    rows.append({"configuration": "frozen base", **count_params(model)})
    info = apply_unfreeze(base, spec, policy)
    where = f"from {info['from_layer']}, " if info["from_layer"] else ""
    rows.append({"configuration": f"UNFREEZE={policy.text} ({where}{info['layers_unfrozen']} of "
                                  f"{info['layers']} layers; BatchNorm frozen)", **count_params(model)})
    return rows


def format_table(rows, title="") -> str:
    w = max(24, *(len(r["configuration"]) + 2 for r in rows))
    lines = [title] if title else []
    lines.append(f"{'configuration':<{w}}{'total':>12}{'trainable':>12}{'non-trainable':>15}")
    for r in rows:
        lines.append(f"{r['configuration']:<{w}}{r['total']:>12,}{r['trainable']:>12,}{r['non_trainable']:>15,}")
    return "\n".join(lines)


# --- the model ----------------------------------------------------------------------------------------------

def augmentation(flip="horizontal", rotation=0.1, zoom=0.1, contrast=0.1, seed=0):
    """The augmentation layers (active only in training), or None when all are off."""
    import keras

    choose(flip, dict.fromkeys(FLIPS), "flip mode")
    for name, v, top in (("ROTATION", rotation, 0.5), ("ZOOM", zoom, 1.0), ("CONTRAST", contrast, 1.0)):
        if not 0 <= v < top:
            raise PipelineError(f"{name}={v}: must be in [0, {top})")
    layers = []
    if flip != "none":
        layers.append(keras.layers.RandomFlip(flip, seed=seed, name="augment_flip"))
    if rotation:
        layers.append(keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=seed + 1,
                                                  name="augment_rotation"))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, fill_mode="reflect", seed=seed + 2, name="augment_zoom"))
    if contrast:
        layers.append(keras.layers.RandomContrast(contrast, seed=seed + 3, name="augment_contrast"))
    return keras.Sequential(layers, name="augment") if layers else None


def build_model(spec, size, base, pooling, head_model, augment=None):
    """Raw (N, size, size, 3) pixels in [0, 255] -> ``augment`` -> the backbone's preprocessing -> ``base``
    (always called with ``training=False``, see extractor.InferenceMode) -> ``pooling`` -> a copy of ``head_model`` (features -> probabilities)
    with its trained weights: fine-tuning leaves the cached head as it was. Layer names are fixed, so a
    rebuilt model takes a backup's weights."""
    import keras

    from pipeline.extractor import POOLING_LAYERS, InferenceMode, Preprocess

    pool = choose(pooling, POOLING_LAYERS, "pooling")
    inputs = keras.Input((size, size, 3), name="pixels")
    x = augment(inputs) if augment is not None else inputs
    x = Preprocess(spec.preprocess, name="preprocess")(x)
    x = InferenceMode(base, name="backbone")(x)  # training=False even inside fit (Dropout off)
    x = pool(name=f"{pooling}_pool")(x)
    head = keras.models.clone_model(head_model)
    head.set_weights(head_model.get_weights())
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_finetune")


def compile_model(model, optimizer="adam", learning_rate=1e-5, momentum=0.9):
    """(Re)compile: Adam or SGD with momentum; the loss and ``accuracy`` metric of the dense head."""
    import keras

    choose(optimizer, dict.fromkeys(OPTIMIZERS), "optimizer")
    if not learning_rate > 0:
        raise PipelineError(f"FINETUNE_LR={learning_rate}: must be positive")
    opt_ = (keras.optimizers.Adam(learning_rate) if optimizer == "adam"
            else keras.optimizers.SGD(learning_rate, momentum=momentum))
    binary = model.output_shape[-1] == 1
    model.compile(optimizer=opt_, loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy") if binary
                           else keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    # the optimizer's variables now, not inside fit's first trace (which then traces twice: seconds lost)
    model.optimizer.build(model.trainable_variables)
    return model


def _find_base(extractor_model):
    import keras

    return next(layer for layer in extractor_model.layers if isinstance(layer, keras.Model))


# --- preparing a job: cache, dense head, model ----------------------------------------------------------------

@dataclass
class Job:
    """Everything a fine-tune needs, resolved from the config; ``model`` is built, unfrozen and compiled."""

    cfg: FinetuneConfig
    plan: object  # features.Plan: dataset, split, backbone, key
    cache: store.Cache
    head: heads.DenseHead
    head_record: dict
    head_record_path: str
    base: object
    model: object
    policy: Unfreeze
    unfreeze: dict
    parameters: list
    log: callable = print
    call: object = None  # the compiled inference call, made once


    @property
    def size(self):
        return self.plan.size

    def split(self, name):
        return self.plan.ds.split(name)

    def images(self, split, labels=False, shuffle=False):
        """Batches of the split's raw pixels, decoded as for the cache (same size and interpolation)."""
        from pipeline import tfdata

        return tfdata.images(self.plan.ds, self.split(split), self.size, self.plan.cfg.interpolation,
                             self.cfg.batch, labels=labels, shuffle_seed=self.cfg.head_seed if shuffle else None)


def _features_config(cfg: FinetuneConfig, cache: store.Cache | None) -> FeaturesConfig:
    """The features options: the config's, or with ``CACHE`` those recorded in the cache file."""
    if cache is None:
        return headstep.features_config(cfg)
    rec = cache.config
    missing = [n for n in fields(FeaturesConfig) if n not in rec]
    if missing:
        raise PipelineError(f"{cache.path}: its record has no features options ({', '.join(missing[:3])}...); "
                            "fine-tuning needs the images: make the cache with make features")
    values = {n: rec[n] for n in fields(FeaturesConfig)}
    if values["data"] not in data.BUILTIN and rec.get("source_root"):
        values["data"] = rec["source_root"]
    return FeaturesConfig(**values)


def _check_options(cfg: FinetuneConfig) -> Unfreeze:
    if cfg.precision != "float32":
        raise PipelineError(f"PRECISION={cfg.precision}: fine-tuning trains in float32 from a float32 cache; "
                            "drop PRECISION (mixed-precision training is not supported)")
    if cfg.head != HEAD_NAME:
        raise PipelineError(f"HEAD={cfg.head}: fine-tuning puts a Keras dense head on the backbone; "
                            f"valid: {HEAD_NAME}")
    choose(cfg.optimizer, dict.fromkeys(OPTIMIZERS), "optimizer")
    choose(cfg.flip, dict.fromkeys(FLIPS), "flip mode")
    if cfg.finetune_epochs < 0 or cfg.finetune_patience < 0:
        raise PipelineError("FINETUNE_EPOCHS and FINETUNE_PATIENCE must be 0 or more")
    if not cfg.finetune_lr > 0:
        raise PipelineError(f"FINETUNE_LR={cfg.finetune_lr}: must be positive")
    if cfg.verbose not in (0, 1, 2):
        raise PipelineError(f"VERBOSE={cfg.verbose}: valid: 0, 1, 2")
    return parse_unfreeze(cfg.unfreeze)


def _resolve_cache(cfg, plan, log):
    from pipeline import features

    features._report_skipped(plan)
    if plan.up_to_date():
        log(f"up to date: {plan.path}")
        return plan.path
    if not cfg.extract:
        raise PipelineError(f"no feature cache for this configuration ({plan.path}); make it with: "
                            f"{headstep.features_command(plan.cfg)}")
    return features.extract(plan)


def dense_head(cfg: FinetuneConfig, extra: dict | None, cache: store.Cache, log=print):
    """(estimator, record, record path) of the dense head trained on ``cache`` with the hyper-parameters in
    ``extra`` over the defaults: the saved one when it matches, else trained now (as ``make head``)."""
    spec = heads.get(HEAD_NAME)
    params = spec.resolve(extra)
    wanted = {k: artifacts.jsonable(v) for k, v in params.items()}
    path = artifacts.record_path(cfg.models_dir, cache.path, HEAD_NAME)
    reason = "none saved for this cache"
    if os.path.exists(path):
        rec = records.read_json(path)
        if rec.get("params") != wanted:
            reason = "the saved one has other hyper-parameters"
        elif (rec.get("config") or {}).get("head_seed") != cfg.head_seed:
            reason = "the saved one has another HEAD_SEED"
        else:
            try:
                est, rec = artifacts.load(path, expect_key=cache.key)
            except PipelineError as e:  # changed file, other versions: it costs seconds to remake
                reason = f"the saved one cannot be used: {e}"
            else:
                val = (rec.get("metrics") or {}).get("val", {}).get("accuracy", float("nan"))
                log(f"phase 1: dense head {spec.describe(params)} from {path} (val accuracy {val:.4f} on the cache)")
                return est, rec, path
    log(f"phase 1: training the dense head on the cache ({reason})")
    hcfg = HeadConfig(**{**{n: getattr(cfg, n) for n in fields(HeadConfig)}, "head": HEAD_NAME,
                         "cache": cache.path})
    paths = headstep.run_head(hcfg, extra, log=log)
    est, rec = artifacts.load(paths["record"], expect_key=cache.key)
    return est, rec, paths["record"]


def prepare(cfg: FinetuneConfig, extra: dict | None = None, log=print) -> Job:
    """Resolve the cache (extracting it when missing), get the dense head (training it when missing), build
    the end-to-end model on the same backbone, apply the unfreeze policy, compile. Nothing is fitted."""
    import keras

    from pipeline import features

    policy = _check_options(cfg)
    heads.get(HEAD_NAME).resolve(extra)  # bad head hyper-parameters fail before any work
    given = store.load(cfg.cache) if cfg.cache else None
    plan = features.Plan(_features_config(cfg, given), log=log)
    base = _find_base(plan.model)
    first_trainable(base, plan.spec, policy)  # an unknown layer name fails before extraction or training
    if given is not None:
        if given.key != plan.key:
            raise PipelineError(f"CACHE={cfg.cache}: its images, backbone or weights have changed since it was "
                                f"made (key {given.key[:12]}, now {plan.key[:12]}); rerun make features")
        path = cfg.cache
    else:
        path = _resolve_cache(cfg, plan, log)
    cache = store.load(path, expect_key=plan.key)
    headstep.check_splits(cache)
    est, head_rec, head_path = dense_head(cfg, extra, cache, log)
    if est.model_.input_shape[-1] != plan.dim:
        raise PipelineError(f"{head_path}: takes {est.model_.input_shape[-1]} features, the backbone gives "
                            f"{plan.dim}; retrain it with make head HEAD=dense")
    keras.utils.set_random_seed(cfg.head_seed)
    augment = augmentation(cfg.flip, cfg.rotation, cfg.zoom, cfg.contrast, seed=cfg.head_seed)
    model = build_model(plan.spec, plan.size, base, plan.cfg.pooling, est.model_, augment)
    table = parameter_table(model, base, plan.spec, policy)
    info = apply_unfreeze(base, plan.spec, policy)
    compile_model(model, cfg.optimizer, cfg.finetune_lr, cfg.momentum)
    alpha = plan.cfg.alpha or plan.spec.alpha
    log(format_table(table, f"parameters of {plan.spec.name}{f' (alpha {alpha})' if alpha else ''} "
                            f"@{plan.size} + dense head:"))
    return Job(cfg, plan, cache, est, head_rec, head_path, base, model, policy, info, table, log)


# --- phase 2: training, resumable ---------------------------------------------------------------------------

def run_dir(job: Job) -> str:
    """Where the backup, the best checkpoint and the epoch log of a fine-tune live (under models/)."""
    return os.path.join(artifacts.head_dir(job.cfg.models_dir, job.cache.path), NAME + "-run")


def identity(job: Job) -> dict:
    """What a backup must match to be resumed: the cache, the head and every option that shapes training."""
    c = job.cfg
    return {"cache_key": job.cache.key, "head_sha256": job.head_record["sha256"], "unfreeze": c.unfreeze,
            "finetune_lr": c.finetune_lr, "optimizer": c.optimizer,
            "momentum": c.momentum if c.optimizer == "sgd" else None, "flip": c.flip, "rotation": c.rotation,
            "zoom": c.zoom, "contrast": c.contrast, "batch": c.batch, "head_seed": c.head_seed,
            "model": job.model.name, "n_weights": len(job.model.weights)}


def _epoch_log(path):
    """Appends each epoch's logs and seconds to a JSON-lines file (flushed): a resumed run keeps its history."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch, "seconds": time.perf_counter() - self.t0,
                   **{k: float(v) for k, v in (logs or {}).items()}}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())

    return EpochLog()


def _early_stopping(patience, start):
    """Keras' EarlyStopping on val loss, restoring the best weights, whose ``best`` starts at ``start`` =
    (val loss, weights, epoch, epochs waited): the head-only model, or the best of a run being resumed."""
    import keras

    class EarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self.best, self.best_weights, self.best_epoch, self.wait = start

    return EarlyStopping(monitor="val_loss", mode="min", patience=patience, restore_best_weights=True)


def _best_checkpoint(path, meta_path, best):
    """Saves the whole model (atomically) whenever val loss beats ``best``; its epoch and loss beside it."""
    import keras

    class BestCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = best

        def on_epoch_end(self, epoch, logs=None):
            v = (logs or {}).get("val_loss")
            if v is None or not v < self.best:
                return
            self.best = float(v)
            with records.atomic_path(path, suffix=".keras") as tmp:
                self.model.save(tmp)
            records.write_json(meta_path, {"epoch": epoch, "val_loss": float(v)})

    return BestCheckpoint()


def _read_rows(path, before):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    break  # a line cut short by a kill: the epochs after it were not backed up either
                if row.get("epoch", before) < before:
                    rows.append(row)
    rows.sort(key=lambda r: r["epoch"])
    return rows


def _start_state(job, folder, ident, log):
    """(epoch to start at, epoch rows so far) after resuming the backup, or clearing a stale one."""
    backup = os.path.join(folder, "backup")
    meta = os.path.join(backup, "training_metadata.json")
    saved = None
    if os.path.exists(os.path.join(folder, "run.json")):
        try:
            saved = records.read_json(os.path.join(folder, "run.json")).get("identity")
        except PipelineError:
            saved = None
    epoch = 0
    if os.path.exists(meta):
        try:
            epoch = int(records.read_json(meta)["epoch"])
        except (PipelineError, KeyError, ValueError, TypeError):
            epoch = 0
    if epoch and saved == ident and job.cfg.resume:
        rows = _read_rows(os.path.join(folder, "epochs.jsonl"), epoch)
        records.atomic_write_text(os.path.join(folder, "epochs.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        log(f"resuming the interrupted fine-tune at epoch {epoch + 1} of {job.cfg.finetune_epochs} "
            f"from {backup}/ ({len(rows)} epoch(s) done; RESUME=0 starts over)")
        return epoch, rows
    if epoch:
        why = "RESUME=0" if not job.cfg.resume else "it is of another configuration"
        log(f"discarding the fine-tune backup in {backup}/ ({why}); starting over")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    records.write_json(os.path.join(folder, "run.json"), {"identity": ident})
    return 0, []


def baseline(job: Job) -> dict:
    """Loss and accuracy of the head-only model on val: the cached head on the cached val features (the
    end-to-end model computes the same before any fine-tune step)."""
    import keras

    va = job.cache.splits["val"]
    p = np.asarray(keras.ops.convert_to_numpy(job.head.model_(va.features, training=False)), np.float64)
    p = np.clip(p, 1e-7, 1 - 1e-7)
    y = va.labels
    if p.shape[1] == 1:
        q = p[:, 0]
        loss = -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))
        acc = np.mean((q > 0.5) == y)
    else:
        loss = -np.mean(np.log(p[np.arange(len(y)), y]))
        acc = np.mean(p.argmax(1) == y)
    return {"val_loss": float(loss), "val_accuracy": float(acc)}


def train(job: Job, callbacks=(), log=None) -> dict:
    """Phase 2: fit end to end on the train images (augmented afresh every epoch, shuffled every epoch),
    early-stopping on the val images; resumes a backup of the same configuration. Returns {"rows": every
    epoch's logs and seconds (resumed ones included), "baseline", "best_epoch", "resumed_at"}."""
    import keras

    log = log or job.log
    cfg = job.cfg
    folder = run_dir(job)
    ident = identity(job)
    start, rows = _start_state(job, folder, ident, log)
    base_val = baseline(job)
    initial = job.model.get_weights()
    best = (base_val["val_loss"], initial, -1, 0)
    best_meta, best_path = os.path.join(folder, "best.json"), os.path.join(folder, "best.keras")
    if start and os.path.exists(best_meta):
        try:
            b = records.read_json(best_meta)
            if b["epoch"] < start and b["val_loss"] < best[0]:
                current = job.model.get_weights()
                job.model.load_weights(best_path)
                best = (b["val_loss"], job.model.get_weights(), b["epoch"], start - 1 - b["epoch"])
                job.model.set_weights(current)
        except (PipelineError, KeyError, OSError, ValueError) as e:
            log(f"warning: best checkpoint {best_path} unreadable ({str(e).splitlines()[0]}); "
                "the best so far is the head-only model")
    if start and best[2] < 0:
        best = (*best[:3], start)
    tr, va = job.split("train"), job.split("val")
    opt_text = (f"Adam lr {cfg.finetune_lr:g}" if cfg.optimizer == "adam"
                else f"SGD lr {cfg.finetune_lr:g} momentum {cfg.momentum:g}")
    log(f"head only on val: loss {base_val['val_loss']:.4f}, accuracy {base_val['val_accuracy']:.4f}")
    start_at = f" (from {job.unfreeze['from_layer']})" if job.unfreeze["from_layer"] else " (backbone frozen)"
    log(f"phase 2: fine-tuning on {len(tr)} train images (val {len(va)}), UNFREEZE={cfg.unfreeze}{start_at}, "
        f"{opt_text}, batch {cfg.batch}, up to "
        f"{cfg.finetune_epochs} epochs (patience {cfg.finetune_patience})")
    cbs = [_epoch_log(os.path.join(folder, "epochs.jsonl")),
           _early_stopping(cfg.finetune_patience, best),
           _best_checkpoint(best_path, best_meta, best[0]),
           keras.callbacks.BackupAndRestore(os.path.join(folder, "backup"), double_checkpoint=True),
           *callbacks]
    class_weight = heads.keras_class_weight(job.head.class_weight, job.cache.splits["train"].labels,
                                            len(job.cache.class_names))
    keras.utils.set_random_seed(cfg.head_seed)
    stopper = cbs[1]
    if cfg.finetune_epochs > start:
        job.model.fit(job.images("train", labels=True, shuffle=True), validation_data=job.images("val", labels=True),
                      epochs=cfg.finetune_epochs, callbacks=cbs, class_weight=class_weight, verbose=cfg.verbose,
                      shuffle=False)  # the dataset reshuffles itself every epoch
    else:
        job.model.set_weights(best[1])
        shutil.rmtree(os.path.join(folder, "backup"), ignore_errors=True)
    rows = _read_rows(os.path.join(folder, "epochs.jsonl"), math.inf)
    best_epoch = int(getattr(stopper, "best_epoch", best[2])) if cfg.finetune_epochs > start else best[2]
    if best_epoch < 0:
        log("fine-tuning did not improve val loss on the head alone: keeping the head-only weights")
    else:
        row = next((r for r in rows if r["epoch"] == best_epoch), {})
        log(f"best epoch {best_epoch + 1} of {len(rows)}: val loss {row.get('val_loss', float('nan')):.4f}, "
            f"val accuracy {row.get('val_accuracy', float('nan')):.4f}; its weights restored")
    return {"rows": rows, "baseline": base_val, "best_epoch": best_epoch, "resumed_at": start}


# --- evaluation, reports, export ------------------------------------------------------------------------------

def combined_history(phase1: dict | None, rows: list) -> tuple[dict, int]:
    """(history over phase 1 then phase 2, the number of phase-1 epochs): the keys both phases have."""
    phase1 = {k: [float(v) for v in vals] for k, vals in (phase1 or {}).items()}
    phase2 = {}
    for row in rows:
        for k, v in row.items():
            if k not in ("epoch", "seconds"):
                phase2.setdefault(k, []).append(v)
    n1 = len(phase1.get("loss", []))
    if not phase2 or not n1:
        return (phase1 if not phase2 else phase2), n1
    return {k: phase1[k] + phase2[k] for k in phase2 if k in phase1}, n1


def comparison(head_only: dict, tuned: dict) -> str:
    """Head only vs fine-tuned, side by side: val and test accuracy, test balanced and top-k accuracy."""
    lines = [f"{'':<26}{'head only':>12}{'fine-tuned':>12}{'change':>10}"]
    for split in ("val", "test"):
        for key in ("accuracy", "balanced_accuracy", *sorted(k for k in tuned[split] if k.startswith("top_"))):
            if split == "val" and key != "accuracy":
                continue
            a, b = head_only[split].get(key), tuned[split].get(key)
            if a is None or b is None:
                continue
            label = f"{split} {key.replace('_', ' ')}"
            lines.append(f"{label:<26}{a:>12.4f}{b:>12.4f}{b - a:>+10.4f}")
    return "\n".join(lines)


def evaluate_model(job: Job, split: str) -> dict:
    """Metrics of the end-to-end model on a split's images (the same metrics as ``make head``)."""
    from pipeline import predict

    if job.call is None:
        job.call = predict.compiled(job.model, job.size)
    p = predict.probabilities(job.call, job.images(split))
    y = np.asarray([job.plan.ds.items[i].label for i in job.split(split)])
    return evaluate.metrics(y, p.argmax(1), job.cache.class_names, p)


def finish(job: Job, result: dict, log=None) -> dict:
    """Evaluate head only and fine-tuned on val and test, print the comparison, write the reports (metrics,
    confusion matrix, combined history and curves), export the model with its record. Returns the paths."""
    from pipeline import predict

    log = log or job.log
    cfg, cache = job.cfg, job.cache
    head_only = {s: headstep.measure(job.head, cache, s) for s in ("val", "test")}
    tuned = {s: evaluate_model(job, s) for s in ("val", "test")}
    n_test = tuned["test"]["n"]
    log(evaluate.table(tuned["test"], f"{NAME} ({cfg.unfreeze}): test split ({n_test} images)"))
    log("head only (phase 1, on cached features) vs fine-tuned (phase 2, end to end):\n"
        + comparison(head_only, tuned))
    rows = result["rows"]
    history, n1 = combined_history(job.head.history_, rows)
    secs = [r["seconds"] for r in rows]
    stem = artifacts.cache_stem(cache.path)
    out = os.path.join(cfg.reports_dir, stem, NAME)
    m = {"head": HEAD_NAME, "head_record": os.path.abspath(job.head_record_path),
         "head_params": job.head_record.get("params"), "unfreeze": job.unfreeze, "parameters": job.parameters,
         "epochs": len(rows), "best_epoch": result["best_epoch"] + 1 if result["best_epoch"] >= 0 else 0,
         "resumed_at_epoch": result["resumed_at"], "seconds_per_epoch": float(np.mean(secs)) if secs else None,
         "fit_seconds": float(np.sum(secs)), "baseline": result["baseline"],
         "head_only": head_only, "val": tuned["val"], "test": tuned["test"]}
    paths = evaluate.write_reports(
        out, m, f"{NAME} on {stem}",
        history={"phase2_start": n1, "combined": history, "phase1": job.head.history_, "phase2": rows},
        curves=history, curves_title=f"{NAME} on {stem}: dense head on the cache, then UNFREEZE={cfg.unfreeze}",
        phase_start=n1)
    spec, plan = job.plan.spec, job.plan
    config = {**asdict(cfg), "size": plan.size, "features": asdict(plan.cfg), "identity": plan.identity}
    paths["record"] = predict.export(
        job.model, os.path.join(artifacts.head_dir(cfg.models_dir, cache.path), NAME + ".keras"),
        class_names=cache.class_names, size=plan.size, interpolation=plan.cfg.interpolation,
        extra={"backbone": spec.name, "alpha": plan.cfg.alpha or spec.alpha, "preprocessing": spec.preprocess,
               "pooling": plan.cfg.pooling, "weights": plan.identity["weights"], "config": config,
               "cache_key": cache.key, "cache_path": os.path.abspath(cache.path),
               "head": {"record": os.path.abspath(job.head_record_path), "sha256": job.head_record["sha256"],
                        "params": job.head_record.get("params")},
               "unfreeze": job.unfreeze, "parameters": job.parameters, "metrics": m,
               "history": history, "phase2_start": n1, "identity": identity(job)})
    paths["checkpoint"] = os.path.join(run_dir(job), "best.keras")
    log(f"saved {paths['record']} (+ {NAME}.keras) and reports in {out}/"
        + (f"; {len(rows)} epoch(s), {m['seconds_per_epoch']:.1f} s each" if secs else ""))
    return paths


def run(cfg: FinetuneConfig, extra: dict | None = None, log=print, callbacks=()) -> dict:
    """The ``finetune`` step: prepare, train (resuming a backup), evaluate, report, export. ``callbacks``
    are added to phase 2's fit. Returns the written paths and, under ``job``, the in-memory job."""
    started = time.perf_counter()
    job = prepare(cfg, extra, log)
    result = train(job, callbacks, log)
    paths = finish(job, result, log)
    log(f"finetune done in {time.perf_counter() - started:.0f} s "
        f"({dt.datetime.now().isoformat(timespec='seconds')})")
    return {**paths, "job": job, "result": result}
