"""Phase 2: fit end to end on the images, resumable. Keras' own callbacks do the work: ``BackupAndRestore``
(training state every epoch), ``CSVLogger`` (the epoch log a resumed run keeps), ``ModelCheckpoint`` (the
best model so far, one file per improving epoch, so a kill mid-save never damages the one kept) and
``EarlyStopping`` from the head-only val loss as ``baseline``. After ``fit`` the weights are the best
epoch's, or exactly the head-only weights when no epoch beat them: fine-tuning never returns a model worse
on val than the cached head."""

from __future__ import annotations

import csv
import math
import os
import shutil
import time

from pipeline import records
from pipeline.errors import PipelineError
from pipeline.finetune.job import NAME, Job
from pipeline.heads import artifacts
from pipeline.heads.dense import keras_class_weight

LOG = "epochs.csv"  # one row per finished epoch, resumed runs included

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


class _Seconds:
    """Adds each epoch's wall seconds to its logs (before ``CSVLogger`` writes them)."""

    def __new__(cls):
        import keras

        class Seconds(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                if logs is not None:
                    logs["seconds"] = time.perf_counter() - self.t0

        return Seconds()


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
    end-to-end model computes the same before any fine-tune step)."""
    from pipeline.heads.dense import batches, compile_model

    va = job.cache.splits["val"]
    head = compile_model(_copy(job.head.model_))
    m = head.evaluate(batches(va.features, va.labels, 256), verbose=0, return_dict=True)
    return {"val_loss": float(m["loss"]), "val_accuracy": float(m["accuracy"])}


def _copy(model):
    import keras

    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def _checkpoint_path(folder, epoch):
    return os.path.join(folder, f"best-{epoch + 1:03d}.keras")  # ModelCheckpoint formats epoch + 1


def _best(rows, threshold):
    """(val loss, epoch) of the best epoch among ``rows`` that beats ``threshold``, else (threshold, -1)."""
    better = [r for r in rows if r.get("val_loss", math.inf) < threshold]
    if not better:
        return threshold, -1
    b = min(better, key=lambda r: (r["val_loss"], r["epoch"]))
    return b["val_loss"], b["epoch"]


def train(job: Job, callbacks=(), log=None) -> dict:
    """Phase 2: fit end to end on the train images (augmented afresh every epoch, shuffled every epoch),
    early-stopping on the val images; resumes a backup of the same configuration. Returns {"rows": every
    epoch's logs and seconds (resumed ones included), "baseline", "best_epoch", "resumed_at"}."""
    import keras

    log = log or job.log
    cfg = job.cfg
    folder = run_dir(job)
    start, rows = _start_state(job, folder, identity(job), log)
    base_val = baseline(job)
    initial = job.model.get_weights()
    best_loss, best_epoch = _best(rows, base_val["val_loss"])
    tr, va = job.split("train"), job.split("val")
    opt_text = (f"Adam lr {cfg.finetune_lr:g}" if cfg.optimizer == "adam"
                else f"SGD lr {cfg.finetune_lr:g} momentum {cfg.momentum:g}")
    log(f"head only on val: loss {base_val['val_loss']:.4f}, accuracy {base_val['val_accuracy']:.4f}")
    start_at = f" (from {job.unfreeze['from_layer']})" if job.unfreeze["from_layer"] else " (backbone frozen)"
    log(f"phase 2: fine-tuning on {len(tr)} train images (val {len(va)}), UNFREEZE={cfg.unfreeze}{start_at}, "
        f"{opt_text}, batch {cfg.batch}, up to "
        f"{cfg.finetune_epochs} epochs (patience {cfg.finetune_patience})")
    if cfg.finetune_epochs > start:
        cbs = [_Seconds(),
               keras.callbacks.ModelCheckpoint(os.path.join(folder, "best-{epoch:03d}.keras"), monitor="val_loss",
                                               mode="min", save_best_only=True, initial_value_threshold=best_loss),
               keras.callbacks.CSVLogger(os.path.join(folder, LOG), append=True),
               keras.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=cfg.finetune_patience,
                                             baseline=best_loss, restore_best_weights=True),
               keras.callbacks.BackupAndRestore(os.path.join(folder, "backup"), double_checkpoint=True),
               *callbacks]
        class_weight = keras_class_weight(job.head.class_weight, job.cache.splits["train"].labels,
                                          len(job.cache.class_names))
        keras.utils.set_random_seed(cfg.head_seed)
        job.model.fit(job.images("train", labels=True, shuffle=True), validation_data=job.images("val", labels=True),
                      epochs=cfg.finetune_epochs, callbacks=cbs, class_weight=class_weight, verbose=cfg.verbose,
                      shuffle=False)  # the dataset reshuffles itself every epoch
    else:
        shutil.rmtree(os.path.join(folder, "backup"), ignore_errors=True)
    rows = read_rows(os.path.join(folder, LOG))
    best_loss, best_epoch = _best(rows, base_val["val_loss"])
    if best_epoch < 0:
        job.model.set_weights(initial)  # no epoch beat the cached head: exactly its weights
        log("fine-tuning did not improve val loss on the head alone: keeping the head-only weights")
    else:
        job.model.load_weights(_checkpoint_path(folder, best_epoch))
        row = next(r for r in rows if r["epoch"] == best_epoch)
        log(f"best epoch {best_epoch + 1} of {len(rows)}: val loss {row['val_loss']:.4f}, "
            f"val accuracy {row.get('val_accuracy', float('nan')):.4f}; its weights restored")
    return {"rows": rows, "baseline": base_val, "best_epoch": best_epoch, "resumed_at": start}
