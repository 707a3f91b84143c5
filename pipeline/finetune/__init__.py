"""``finetune``: the end-to-end model — raw pixels -> augmentation -> the backbone's preprocessing -> backbone
-> the cache's pooling -> the dense head trained on the cache — with the top of the backbone unfrozen.

Phase 1 is the dense head on the feature cache (loaded from ``make head HEAD=dense``, trained first when
missing). Phase 2 trains end to end on the images at a low learning rate, BatchNorm frozen
(``trainable=False``: in Keras 3 the backbone's ``training=False`` alone does not stop ``fit`` from updating
the moving statistics), early-stopping on val loss from the head-only starting point, resumable after a
kill. The result is evaluated like ``make head`` and exported as one ``.keras`` file taking raw images.
Modules: :mod:`.unfreeze`, :mod:`.model`, :mod:`.job` (prepare), :mod:`.train` (phase 2), :mod:`.report`,
:mod:`.artifact` (the exported file and its record). The modules that build and train import Keras; they are
imported lazily here, since predict reads fine-tuned records (:mod:`.artifact`) through this package.
"""

from __future__ import annotations

import datetime as dt
import time

from pipeline import lock
from pipeline.configs import FinetuneConfig
from pipeline.heads import artifacts


def run(cfg: FinetuneConfig, extra: dict | None = None, log=print, callbacks=()) -> dict:
    """The ``finetune`` step: prepare, train (resuming a backup), evaluate, report, export. ``callbacks``
    are added to phase 2's fit. Returns the written paths and, under ``job``, the in-memory job."""
    from pipeline.finetune.job import prepare
    from pipeline.finetune.report import finish
    from pipeline.finetune.train import train

    started = time.perf_counter()
    job = prepare(cfg, extra, log)
    with lock.locked(artifacts.head_dir(cfg.models_dir, job.cache.path) + "-finetune", log=log):
        result = train(job, callbacks, log)  # one fine-tune at a time on a cache: its backup is shared
        paths = finish(job, result, log)
    log(f"finetune done in {time.perf_counter() - started:.0f} s "
        f"({dt.datetime.now().isoformat(timespec='seconds')})")
    return {**paths, "job": job, "result": result}


def step(cfg: FinetuneConfig, extra: dict | None = None) -> None:
    """The ``finetune`` step."""
    run(cfg, extra)
