"""``head``: fit one head on the cache's train split (the dense head early-stops on val), report val accuracy
and the full test metrics, save the head and its reports. The pieces the sweep and fine-tuning share live
here too: checking the cache's splits, evaluating and saving a fitted head.
The dense head (Keras) is imported lazily, where a head is fitted: a scikit-learn head loads no TensorFlow."""

from __future__ import annotations

import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline import lock, quiet, records
from pipeline.cache import lazy, resolve, store
from pipeline.cache.resolve import load_cache
from pipeline.configs import HeadConfig, asdict
from pipeline.errors import PipelineError
from pipeline.heads import artifacts, calibrate, registry, stream
from pipeline.reports import errors, evaluate
from pipeline.reports.audit import leaks


def check_outputs(cfg: HeadConfig) -> None:
    """MODELS_DIR and REPORTS_DIR writable, checked before any work: a one-line error otherwise."""
    records.writable_dir(cfg.models_dir, "MODELS_DIR")
    records.writable_dir(cfg.reports_dir, "REPORTS_DIR")


def check_splits(cache: store.Cache, needed=("train", "val", "test")) -> None:
    """Every split present and holding every class: a clear error otherwise."""
    names = cache.class_names
    for s in needed:
        if s not in cache.splits or not len(cache.splits[s].labels):
            raise PipelineError(f"{cache.path}: no {s} split; remake the cache with VAL_FRACTION and "
                                f"TEST_FRACTION above 0 (or give the tree a {s}/ folder)")
        counts = np.bincount(cache.splits[s].labels, minlength=len(names))
        absent = [names[i] for i in np.flatnonzero(counts == 0)]
        if absent:
            raise PipelineError(f"{cache.path}: class {', '.join(absent)} has no image in the {s} split; "
                                "add images or change VAL_FRACTION/TEST_FRACTION/SEED")


def views_of(cache, cfg):
    """The cache's augmented views of its train images that a head trains on: the first VIEWS of each (all of
    them when VIEWS=0 names a cache that has views), or None."""
    if cache.views is None:
        return None
    return cache.views.upto(cfg.views) if cfg.views else cache.views


def views_used(cache, cfg) -> int:
    """How many views of each train image a head trains on (:func:`views_of`): 0 without views."""
    views = views_of(cache, cfg)
    return 0 if views is None or not len(views.view) else int(views.view.max()) + 1


def fit(name, est, X, y, validation_data=None, views=None):
    """Fit a head; the seconds it took. ``views`` (augmented views of X's rows): the dense head draws one row
    per image each epoch among its clean row and its views, scikit-learn heads fit on every row. scikit-learn
    heads fit with one BLAS thread: on cached features the matrices are small, and BLAS threads spinning for a
    shared core cost far more than they bring."""
    from pipeline.heads.dense import DenseHead

    if isinstance(est, DenseHead):  # TensorFlow and Keras loaded before the clock: the fit's time is the fit's
        quiet.tensorflow()
        import keras  # noqa: F401
    t0 = time.perf_counter()
    try:
        if isinstance(est, DenseHead):
            est.fit(X, y, **({"validation_data": validation_data} if validation_data is not None else {}),
                    views=None if views is None else (views.features, views.image))
        else:
            if views is not None:
                X, y = np.concatenate([X, views.features]), np.concatenate([y, views.labels])
            with threadpool_limits(1, user_api="blas"):
                est.fit(X, y)
    except ValueError as e:
        raise PipelineError(f"head {name!r} cannot be fitted on this cache: {str(e).splitlines()[0]}") \
            from None
    return time.perf_counter() - t0


def measure(est, cache, split) -> dict:
    """Metrics of a fitted head on one split of the cache."""
    sp = cache.splits[split]
    return evaluate.metrics(sp.labels, est.predict(sp.features), cache.class_names, registry.scores(est, sp.features))


def measure_tta(est, cache, split) -> dict | None:
    """Metrics on one split with test-time augmentation: the head's scores (:func:`registry.scores`:
    probabilities, else decision values) averaged over each clean row and its flipped row; None when the
    cache has no TTA rows."""
    if split not in cache.tta:
        return None
    sp, flipped = cache.splits[split], cache.tta[split]
    s = (registry.scores(est, sp.features) + registry.scores(est, flipped.features)) / 2
    return evaluate.metrics(sp.labels, est.classes_[np.argmax(s, axis=1)], cache.class_names, s)


def finish(est, cache, cfg, name, head, params, extra, log=print, on_val=True) -> dict:
    """Evaluate on val (``on_val``: when val was not trained on) and test, with TTA too when the cache has its
    rows, write the reports and save the head: the paths written."""
    val = measure(est, cache, "val") if on_val else None
    tta = {s: m for s in (("val", "test") if on_val else ("test",)) if (m := measure_tta(est, cache, s))}
    if val:
        log(f"val accuracy {val['accuracy']:.4f}, balanced {val['balanced_accuracy']:.4f}"
            + (f"; with TTA (flip) {tta['val']['accuracy']:.4f}" if "val" in tta else ""))
    label = name if name == head else f"{name} ({head})"
    test = measure(est, cache, "test")
    log(evaluate.table(test, f"{label}: test split ({len(cache.splits['test'].labels)} images)"))
    if "test" in tta:
        log(f"test accuracy {test['accuracy']:.4f}, with TTA (flip) {tta['test']['accuracy']:.4f}")
        extra = {**extra, "tta": {"augmentation": "horizontal flip, scores averaged with the clean row's", **tta}}
    stem = resolve.stem(cache.path)
    out = os.path.join(cfg.reports_dir, stem, name)
    m = {"head": head, "params": {k: artifacts.jsonable(v) for k, v in params.items()}, **extra,
         **({"val": val} if val else {}), "test": test}
    history = getattr(est, "history_", None)
    calib = calibrated(est, cache, cfg, on_val, log)
    with lock.locked(artifacts.head_dir(cfg.models_dir, cache.path), log=log):  # one writer per models folder
        found = _analyse(est, cache, cfg, out, label, m, log)  # first: metrics.json counts what it found
        paths = {**evaluate.write_reports(out, m, f"{label} on {stem}", history), **found}
        paths["record"] = artifacts.save(est, name=name, head=head, params=params, cache=cache,
                                         config=asdict(cfg), metrics=m, models_dir=cfg.models_dir, history=history,
                                         extra=calib)
    log(f"saved {paths['record']} and reports in {out}/")
    return paths


def calibrated(est, cache, cfg, on_val, log=print) -> dict:
    """The record's calibration fields (:func:`pipeline.heads.calibrate.fit`) of ``CALIBRATE`` and ``REJECT_RECALL``,
    fitted on val: none when val was trained on or the head gives no probabilities (said so)."""
    calibrate.check(cfg.calibrate, cfg.reject_recall)
    if cfg.calibrate == "none" and not cfg.reject_recall:
        return {}
    why = ("val was trained on" if not on_val else
           "the head gives decision values, not probabilities" if not hasattr(est, "predict_proba") else "")
    if why:
        log(f"note: no temperature nor unknown-image threshold: {why}")
        return {}
    split = {s: (registry.scores(est, cache.splits[s].features), np.searchsorted(est.classes_, cache.splits[s].labels))
             for s in ("val", "test")}
    found = calibrate.fit(*split["val"], *split["test"], cfg.calibrate, cfg.reject_recall)
    for line in calibrate.describe(found):
        log(line)
    return found


def _analyse(est, cache, cfg, out, label, m, log) -> dict:
    """errors.csv and errors.png of the test split; a one-line pointer to ``make audit`` when exact copies of
    an image stand in more than one split."""
    sp = cache.splits["test"]
    k = min(3, len(cache.class_names))
    wrong = errors.misclassified(sp.labels, registry.scores(est, sp.features), cache.class_names, sp.paths, k)
    paths = {"errors": os.path.join(out, "errors.csv")}
    errors.write_csv(paths["errors"], wrong, k)
    m["errors"] = len(wrong)
    sheet = os.path.join(out, "errors.png")
    if wrong and errors.plot_sheet(sheet, wrong, cache.config.get("source_root"),
                                   f"{label}: the most confidently wrong of {len(wrong)} test errors"):
        paths["errors_sheet"] = sheet
    elif os.path.exists(sheet):
        os.remove(sheet)  # of an earlier head that erred
    log(f"{len(wrong)} misclassified test image(s): {paths['errors']}"
        + (f" and {sheet}" if "errors_sheet" in paths else ""))
    across = audit_pointer(cache)
    m["exact_duplicates_across_splits"] = across
    if across:
        log(f"note: {across} image(s) stand in more than one split (exact copies); see make audit")
    return paths


def audit_pointer(cache) -> int:
    """How many images stand, as exact copies, in more than one split (0 when the cache has no content hashes)."""
    hashes = leaks.stored_hashes(cache)
    if hashes is None:
        return 0
    return sum(g["across"] for g in leaks.exact(hashes, {s: sp.paths for s, sp in cache.splits.items()}))


def run_head(cfg: HeadConfig, extra: dict | None = None, log=print) -> dict:
    """Train head ``cfg.head`` (hyper-parameters in ``extra``) on the cache; returns the written paths."""
    head = registry.get(cfg.head)
    params = head.resolve(extra)
    calibrate.check(cfg.calibrate, cfg.reject_recall)
    check_outputs(cfg)
    cache = load_cache(cfg, log)
    if lazy.is_lazy(cache):  # past MEMORY_BUDGET
        return stream.train_past_budget(cache, cfg, head.name, params, log)
    return train_head(cache, cfg, head.name, params, log)


def train_head(cache: store.Cache, cfg: HeadConfig, name: str, params: dict, log=print) -> dict:
    """Fit head ``name`` with its resolved ``params`` on a loaded cache, report and save it; the paths."""
    head = registry.get(name)
    check_splits(cache)
    tr, va = cache.splits["train"], cache.splits["val"]
    views = views_of(cache, cfg)
    est = head.build(params, seed=cfg.head_seed)
    with_views = f" (+{len(views.labels)} augmented views)" if views is not None else ""
    log(f"{head.name} {head.describe(params)} on {os.path.basename(cache.path)}: train {len(tr.labels)}{with_views}, "
        f"val {len(va.labels)}, test {len(cache.splits['test'].labels)} x {tr.features.shape[1]}")
    secs = fit(head.name, est, tr.features, tr.labels, (va.features, va.labels), views)
    epochs = len(est.history_["loss"]) if getattr(est, "history_", None) else None
    log(f"fitted in {secs:.2f} s" + (f" ({epochs} epochs)" if epochs else ""))
    return finish(est, cache, cfg, head.name, head.name, params,
                  {"fit_seconds": secs, "trained_on": "train", "views": views_used(cache, cfg)},
                  log)


def step(cfg: HeadConfig, extra: dict | None = None) -> None:
    """The ``head`` step."""
    run_head(cfg, extra)
