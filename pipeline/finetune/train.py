"""Phase 2: fit end to end on the images, resumable. Keras' own callbacks do the work: ``BackupAndRestore``
(training state every epoch), ``CSVLogger`` (the epoch log a resumed run keeps), ``ModelCheckpoint`` (the
best model so far, one file per improving epoch, so a kill mid-save never damages the one kept) and
``EarlyStopping`` from the head-only model's FINETUNE_MONITOR (val accuracy, or val loss) as ``baseline``.
After ``fit`` the weights are the best epoch's, or exactly the head-only weights when no epoch beat them:
fine-tuning never returns a model worse on val than the cached head. Val accuracy is the default because the
val loss of a fine-tuned model rises with its confidence while its accuracy still climbs (docs/finetune.md). Before ``fit`` the model is recompiled with every phase-2 option: the rate schedule (linear
warmup then cosine decay over all of phase 2's steps, or constant), AdamW's weight decay, label smoothing
(on one-hot labels; the baseline's val loss smoothed too)."""

from __future__ import annotations

import csv
import math
import os
import shutil
import time

import keras
import tensorflow as tf

from pipeline import records
from pipeline.errors import PipelineError
from pipeline.finetune import model as ft_model
from pipeline.finetune.job import NAME, Job
from pipeline.heads import artifacts
from pipeline.heads.dense import batches, fit_verbose, keras_class_weight

LOG = "epochs.csv"  # one row per finished epoch, resumed runs included

def run_dir(job: Job) -> str:
    """Where the backup, the best checkpoint and the epoch log of a fine-tune live (under models/)."""
    return os.path.join(artifacts.head_dir(job.cfg.models_dir, job.cache.path), NAME + "-run")


def steps_per_epoch(job: Job) -> int:
    """Optimizer steps in one epoch of phase 2: ceil(train images / BATCH)."""
    return math.ceil(len(job.split("train")) / job.cfg.batch)


def total_steps(job: Job) -> int:
    """Steps of the whole of phase 2 (FINETUNE_EPOCHS of them): the length of the cosine schedule."""
    return job.cfg.finetune_epochs * steps_per_epoch(job)


def identity(job: Job) -> dict:
    """What a backup must match to be resumed: the cache, the head and every option that shapes training
    (the cosine schedule's length too: it depends on FINETUNE_EPOCHS and the train images)."""
    c = job.cfg
    cosine = c.schedule == "cosine"
    return {"cache_key": job.cache.key, "head_sha256": job.head_record["sha256"], "unfreeze": c.unfreeze,
            "finetune_lr": c.finetune_lr, "optimizer": c.optimizer,
            "momentum": c.momentum if c.optimizer == "sgd" else None, "flip": c.flip, "rotation": c.rotation,
            "zoom": c.zoom, "contrast": c.contrast, "batch": c.batch, "head_seed": c.head_seed,
            "schedule": c.schedule, "warmup": c.warmup if cosine else None,
            "schedule_steps": total_steps(job) if cosine else None, "weight_decay": c.weight_decay,
            "label_smoothing": c.label_smoothing, "monitor": c.finetune_monitor,
            "model": job.model.name, "n_weights": len(job.model.weights)}


def compile_phase2(job: Job):
    """Recompile ``job.model`` with every phase-2 option: the optimizer (AdamW with WEIGHT_DECAY), the rate
    schedule over :func:`total_steps`, label smoothing. Returns whether the labels must be one-hot."""
    c = job.cfg
    ft_model.check_options(c.schedule, c.warmup, c.weight_decay, c.label_smoothing)
    ft_model.compile_model(job.model, c.optimizer, c.finetune_lr, c.momentum, schedule=c.schedule, warmup=c.warmup,
                           total_steps=total_steps(job), weight_decay=c.weight_decay,
                           label_smoothing=c.label_smoothing)
    return ft_model.loss_and_metric(job.model.output_shape[-1] == 1, c.label_smoothing)[2]


def describe_optimizer(cfg) -> str:
    """The optimizer, its rate schedule and the other phase-2 options, in words."""
    name = "SGD" if cfg.optimizer == "sgd" else ("AdamW" if cfg.weight_decay else "Adam")
    text = f"{name} lr {cfg.finetune_lr:g}"
    if cfg.schedule == "cosine":
        text += f" (cosine, warmup {cfg.warmup:g})"
    if cfg.optimizer == "sgd":
        text += f" momentum {cfg.momentum:g}"
    if cfg.weight_decay:
        text += f" weight decay {cfg.weight_decay:g}"
    if cfg.label_smoothing:
        text += f", label smoothing {cfg.label_smoothing:g}"
    return text


def _one_hot(dataset, n_classes):
    """(pixels, label) batches -> (pixels, one-hot label) batches, for the label-smoothed loss."""
    def one_hot(x, y):
        return x, tf.one_hot(y, n_classes)

    return dataset.map(one_hot, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class Seconds(keras.callbacks.Callback):
    """Adds each epoch's wall seconds to its logs (before ``CSVLogger`` writes them)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["seconds"] = time.perf_counter() - self.t0


def read_rows(path, before=math.inf) -> list[dict]:
    """The epoch rows of ``CSVLogger``'s file with epoch < ``before``, as numbers, in epoch order."""
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    row = {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
                except (TypeError, ValueError):
                    break  # a line cut short by a kill: the epochs after it were not backed up either
                if row["epoch"] < before:
                    rows.append(row)
    rows.sort(key=lambda r: r["epoch"])
    return rows


def _write_rows(path, rows):
    """Rewrite the epoch log with ``rows`` (the epochs a resumed run keeps), atomically."""
    if not rows:
        if os.path.exists(path):
            os.remove(path)
        return
    keys = ["epoch", *sorted(k for k in rows[0] if k != "epoch")]
    with records.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)


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
        rows = read_rows(os.path.join(folder, LOG), epoch)
        _write_rows(os.path.join(folder, LOG), rows)
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
    end-to-end model computes the same before any fine-tune step), with phase 2's loss (label-smoothed with
    LABEL_SMOOTHING, so that the val losses compared are the same function)."""
    va = job.cache.splits["val"]
    head = _copy(job.head.model_)
    loss, metric, one_hot = ft_model.loss_and_metric(head.output_shape[-1] == 1, job.cfg.label_smoothing)
    head.compile(loss=loss, metrics=[metric])
    data = batches(va.features, va.labels, 256)
    if one_hot:
        data = _one_hot(data, head.output_shape[-1])
    m = head.evaluate(data, verbose=0, return_dict=True)
    return {"val_loss": float(m["loss"]), "val_accuracy": float(m["accuracy"])}


def _copy(model):
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def _checkpoint_path(folder, epoch):
    return os.path.join(folder, f"best-{epoch + 1:03d}.keras")  # ModelCheckpoint formats epoch + 1


def _mode(monitor):
    return "min" if monitor == "val_loss" else "max"


def _best(rows, threshold, monitor="val_loss"):
    """(value, epoch) of the best epoch among ``rows`` that beats ``threshold`` on ``monitor`` (the first of
    equals, the one ModelCheckpoint kept), else (threshold, -1)."""
    sign = 1 if _mode(monitor) == "min" else -1
    better = [r for r in rows if sign * r.get(monitor, sign * math.inf) < sign * threshold]
    if not better:
        return threshold, -1
    b = min(better, key=lambda r: (sign * r[monitor], r["epoch"]))
    return b[monitor], b["epoch"]


def early_stopping(cfg, steps, baseline):
    """Keras' ``EarlyStopping`` of phase 2: on FINETUNE_MONITOR from ``baseline`` (the head alone's) with
    FINETUNE_PATIENCE, counting no epoch inside the schedule's protected ones
    (:func:`pipeline.finetune.model.protected_epochs`). It restores nothing: the best epoch's checkpoint, which
    sees every epoch, is loaded after ``fit``."""
    start = ft_model.protected_epochs(cfg.finetune_epochs, steps, cfg.schedule, cfg.warmup)
    return keras.callbacks.EarlyStopping(monitor=cfg.finetune_monitor, mode=_mode(cfg.finetune_monitor),
                                         patience=cfg.finetune_patience, baseline=baseline, start_from_epoch=start)


def _protection(job) -> str:
    """The log's words on the protected epochs."""
    n = ft_model.protected_epochs(job.cfg.finetune_epochs, steps_per_epoch(job), job.cfg.schedule, job.cfg.warmup)
    # the earliest epoch (from 1) it can stop at: Keras' first counted epoch always beats its initial best (inf)
    first = min(n + max(job.cfg.finetune_patience, 2), job.cfg.finetune_epochs)
    return f", not stopping before epoch {first}: the rate decays until then" if n else ""


def train(job: Job, callbacks=(), log=None) -> dict:
    """Phase 2: fit end to end on the train images (augmented afresh every epoch, shuffled every epoch),
    early-stopping on the val images; resumes a backup of the same configuration. Returns {"rows": every
    epoch's logs and seconds (resumed ones included), "baseline", "best_epoch", "resumed_at"}."""
    log = log or job.log
    cfg = job.cfg
    folder = run_dir(job)
    one_hot = compile_phase2(job)  # bad options fail before the backup is touched
    start, rows = _start_state(job, folder, identity(job), log)
    base_val = baseline(job)
    initial = job.model.get_weights()
    monitor = cfg.finetune_monitor
    best_value, best_epoch = _best(rows, base_val[monitor], monitor)
    tr, va = job.split("train"), job.split("val")
    opt_text = describe_optimizer(cfg)
    smoothed = f" (label smoothing {cfg.label_smoothing:g})" if cfg.label_smoothing else ""
    log(f"head only on val: loss {base_val['val_loss']:.4f}{smoothed}, accuracy {base_val['val_accuracy']:.4f}")
    start_at = f" (from {job.unfreeze['from_layer']})" if job.unfreeze["from_layer"] else " (backbone frozen)"
    log(f"phase 2: fine-tuning on {len(tr)} train images (val {len(va)}), UNFREEZE={cfg.unfreeze}{start_at}, "
        f"{opt_text}, batch {cfg.batch}, up to "
        f"{cfg.finetune_epochs} epochs (best {monitor.replace('_', ' ')}, patience {cfg.finetune_patience}"
        f"{_protection(job)})")
    if cfg.finetune_epochs > start:
        cbs = [Seconds(),
               keras.callbacks.ModelCheckpoint(os.path.join(folder, "best-{epoch:03d}.keras"), monitor=monitor,
                                               mode=_mode(monitor), save_best_only=True,
                                               initial_value_threshold=best_value),
               keras.callbacks.CSVLogger(os.path.join(folder, LOG), append=True),
               early_stopping(cfg, steps_per_epoch(job), best_value),
               keras.callbacks.BackupAndRestore(os.path.join(folder, "backup"), double_checkpoint=True),
               *callbacks]
        class_weight = keras_class_weight(job.head.class_weight, job.cache.splits["train"].labels,
                                          len(job.cache.class_names))
        keras.utils.set_random_seed(cfg.head_seed)
        train_data, val_data = job.images("train", labels=True, shuffle=True), job.images("val", labels=True)
        if one_hot:  # label smoothing: categorical cross-entropy on one-hot labels
            n = len(job.cache.class_names)
            train_data, val_data = _one_hot(train_data, n), _one_hot(val_data, n)
        job.model.fit(train_data, validation_data=val_data, epochs=cfg.finetune_epochs, callbacks=cbs,
                      class_weight=class_weight, verbose=fit_verbose(cfg.verbose),
                      shuffle=False)  # the dataset reshuffles itself every epoch
    else:
        shutil.rmtree(os.path.join(folder, "backup"), ignore_errors=True)
    rows = read_rows(os.path.join(folder, LOG))
    best_value, best_epoch = _best(rows, base_val[monitor], monitor)
    if best_epoch < 0:
        job.model.set_weights(initial)  # no epoch beat the cached head: exactly its weights
        log(f"fine-tuning did not improve {monitor.replace('_', ' ')} on the head alone: keeping the head-only "
            "weights")
    else:
        job.model.load_weights(_checkpoint_path(folder, best_epoch))
        row = next(r for r in rows if r["epoch"] == best_epoch)
        log(f"best epoch {best_epoch + 1} of {len(rows)}: val loss {row['val_loss']:.4f}, "
            f"val accuracy {row.get('val_accuracy', float('nan')):.4f}; its weights restored")
    return {"rows": rows, "baseline": base_val, "best_epoch": best_epoch, "resumed_at": start}
