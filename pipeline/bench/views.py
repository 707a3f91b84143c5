"""``views`` (run only when SECTIONS names it): augmented views cached once against the Keras guide's first
workflow, the frozen backbone trained with augmentation inside ``fit``. For each VIEWS_BACKBONES entry, on
DATA's split (PER_CLASS shrinks it): ``features`` run as whole commands with VIEWS=0 and with the largest of
VIEWS_COUNTS, whose cache serves the smaller counts (``store.Views.upto``); logreg and the dense head
(VIEWS_EPOCHS epochs, its other defaults) fitted on each count and scored on clean test; the guide's model
(augmentation -> frozen backbone -> the same dense head) fitted VIEWS_EPOCHS epochs on the decoded train
images, scored on clean test.
What a measurement needs (TensorFlow, Keras, the steps it runs) is imported lazily, in the function that
measures: ``make bench`` imports only the sections it runs."""

from __future__ import annotations

import glob
import os
import re
import time

import numpy as np

from pipeline.memo import NAME as MEMO
from pipeline.bench.common import entry_label, features_args, features_config, quality_entries, quiet, run_child
from pipeline.configs import replace
from pipeline.errors import PipelineError

HEADS = ("logreg", "dense")
RATIO_GOAL = 0.2
GOAL = "K-view head >= guide frozen+augmentation accuracy at <= 1/5 of its wall time over 20 epochs"


def counts(text) -> list[int]:
    """The VIEWS compared, ascending, 0 always among them."""
    try:
        ks = {int(k) for k in text.split(",") if k.strip()}
    except ValueError:
        raise PipelineError(f"VIEWS_COUNTS={text!r}: expected a comma list of whole numbers, e.g. 0,4,8") from None
    if any(k < 0 for k in ks):
        raise PipelineError(f"VIEWS_COUNTS={text!r}: counts must be 0 or more")
    return sorted(ks | {0})


def check(cfg) -> None:
    """VIEWS_BACKBONES, VIEWS_COUNTS and VIEWS_EPOCHS, before any work."""
    quality_entries(cfg.views_backbones)
    counts(cfg.views_counts)
    if cfg.views_epochs < 1:
        raise PipelineError(f"VIEWS_EPOCHS={cfg.views_epochs}: must be 1 or more")


def run(ctx):
    cfg = ctx.cfg
    entries, ks = quality_entries(cfg.views_backbones), counts(cfg.views_counts)
    rows, m, show, verdicts, met = [], {}, [], [], []
    for i, (backbone, alpha, weights) in enumerate(entries):
        fcfg = features_config(cfg, backbone=backbone, alpha=alpha, weights=weights, views=0, tta=False)
        label = entry_label(backbone, alpha, weights)
        try:
            row = _backbone(ctx, fcfg, ks, f"views-{i}")
        except PipelineError as e:
            rows.append({"label": label, "error": str(e)[:300]})
            m[f"b{i}_error"] = (str(e)[:60], "")
            show.append((f"{label}: failed", f"b{i}_error"))
            ctx.log(f"views: {label}: {e}")
            continue
        row["label"] = label
        rows.append(row)
        _show(row, f"b{i}", label, m, show)
        ok = row["goal"]["met"]
        met.append(ok)
        verdicts.append((f"{label}: goal", ("met" if ok else "NOT met") + f" by {row['goal']['by']}"))
    kmax = ks[-1]
    out = {"metrics": m, "rows": rows, "show": show, "verdicts": verdicts,
           "note": f"DATA={cfg.data}, PER_CLASS={cfg.per_class}; extraction is a whole `features` command from "
                   f"scratch (VIEWS=0 and VIEWS={kmax}; a count between is served by the VIEWS={kmax} cache, its "
                   f"extraction estimated as VIEWS=0 + K x the per-view seconds, the difference of the two "
                   f"commands' extraction phases over {kmax}); heads fitted on train (dense: "
                   f"{cfg.views_epochs} epochs at most, early stopping on val), scored on clean test; the guide: "
                   f"augmentation -> frozen backbone -> the same dense head, {cfg.views_epochs} epochs on the "
                   f"decoded train images (val each epoch, best val-loss weights kept), its wall time = build + fit "
                   f"+ test; the goal's K-view head is the K > 0 head best on val"}
    if met:
        out.update(goal=GOAL, met=all(met))
    return out


def _extract(ctx, fcfg, name) -> tuple[str, float, float]:
    """(cache path, seconds, seconds of its extraction phase) of ``python -m pipeline features`` into a fresh
    folder of its own."""
    folder = os.path.join(ctx.work, name)
    os.makedirs(folder)
    r = run_child(["features", *features_args(replace(fcfg, cache_dir=folder))], folder + ".log")
    [path] = glob.glob(os.path.join(folder, "*.h5"))
    with open(folder + ".log") as f:
        phase = re.findall(r"; \d+ images in ([0-9.]+) s \(", f.read())
    if not phase:
        raise PipelineError(f"{folder}.log: the features command reported no extraction")
    return path, r["seconds"], float(phase[-1])


def _backbone(ctx, fcfg, ks, name) -> dict:
    from pipeline.cache import store

    kmax = ks[-1]
    p0, t0, e0 = _extract(ctx, fcfg, f"{name}-0")
    pmax, tmax, emax = _extract(ctx, replace(fcfg, views=kmax), f"{name}-{kmax}") if kmax else (p0, t0, e0)
    c0, cmax = store.load(p0), store.load(pmax)
    per_view = (emax - e0) / kmax if kmax else 0.0  # of the extraction phases: start-up and scan cancel out
    row = {"extract_s": {"0": t0, str(kmax): tmax}, "phase_s": {"0": e0, str(kmax): emax}, "per_view_s": per_view,
           "cache_mib": {"0": os.path.getsize(p0) / 2**20, str(kmax): os.path.getsize(pmax) / 2**20},
           "counts": {s: int(len(sp.labels)) for s, sp in c0.splits.items()}, "by_k": {}}
    for k in ks:
        cache = c0 if k == 0 else cmax
        views = cache.views.upto(k) if k else None
        extraction = t0 if k == 0 else tmax if k == kmax else t0 + k * per_view
        row["by_k"][str(k)] = {"extract_s": extraction, "estimated": 0 < k < kmax,
                               "heads": {h: _head(ctx, h, cache, views, extraction) for h in HEADS}}
    row["guide"] = _guide(ctx, fcfg, os.path.dirname(p0))
    guide = row["guide"]
    candidates = [(r["val"], k, h) for k, by in row["by_k"].items() if k != "0" for h, r in by["heads"].items()]
    if candidates:
        _, k, h = max(candidates)  # the K > 0 head best on val
        best = row["by_k"][k]["heads"][h]
        ratio = best["wall_s"] / guide["wall_s"]
        row["goal"] = {"by": f"VIEWS={k} {h}: test {best['test']:.4f} vs {guide['test']:.4f}, wall ratio {ratio:.3f}",
                       "met": best["test"] >= guide["test"] and ratio <= RATIO_GOAL}
    else:
        row["goal"] = {"by": "no VIEWS > 0 in VIEWS_COUNTS", "met": False}
    dense_max = row["by_k"][str(kmax)]["heads"]["dense"]
    row["ratio"] = dense_max["wall_s"] / guide["wall_s"]
    row["breakeven_epochs"] = tmax / guide["epoch_s"]
    return row


def _head(ctx, name, cache, views, extraction) -> dict:
    """A head fitted on the cache's train rows (and ``views``): val and test accuracy, fit seconds, wall."""
    from pipeline.heads import registry
    from pipeline.heads.train import fit

    tr, va, te = cache.train, cache.val, cache.test
    est = registry.build(name, {"epochs": ctx.cfg.views_epochs} if name == "dense" else None, seed=ctx.cfg.seed)
    with quiet():
        secs = fit(name, est, tr.features, tr.labels, (va.features, va.labels), views)
    return {"val": float(np.mean(est.predict(va.features) == va.labels)),
            "test": float(np.mean(est.predict(te.features) == te.labels)), "fit_s": secs, "wall_s": extraction + secs}


def _guide(ctx, fcfg, cache_dir) -> dict:
    """The guide's model fitted end to end: test accuracy, wall seconds (build + fit + test), seconds per epoch
    (the median epoch)."""
    import keras

    from pipeline.backbones import extractor, registry
    from pipeline.data import loading, sources
    from pipeline.finetune.model import augmentation, build_model
    from pipeline.heads import dense

    cfg, epochs = ctx.cfg, ctx.cfg.views_epochs
    spec = registry.get(fcfg.backbone)
    size = registry.resolve_size(spec, fcfg.size)
    ds = sources.open_source(fcfg.data, fcfg.val_fraction, fcfg.test_fraction, fcfg.seed, fcfg.per_class,
                             fcfg.max_pixels, os.path.join(cache_dir, MEMO), progress=False)

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.secs = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.secs.append(time.perf_counter() - self.t0)

    def images(split, shuffle=False):
        return loading.dataset(ds, ds.split(split), size, fcfg.interpolation, fcfg.batch, labels=True,
                               shuffle_seed=cfg.seed if shuffle else None)

    t0 = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    fx, base = extractor.build(spec, size, fcfg.weights, fcfg.pooling, alpha=fcfg.alpha or None, seed=fcfg.seed,
                               keras_home=fcfg.keras_home, gem_p=fcfg.gem_p)
    base.trainable = False
    head = dense.build_model(int(fx.output_shape[-1]), len(ds.class_names))  # DenseHead's defaults
    model = build_model(spec, size, base, fcfg.pooling, head,
                        augmentation(fcfg.flip, fcfg.rotation, fcfg.zoom, fcfg.contrast, seed=cfg.seed),
                        gem_p=fcfg.gem_p)
    dense.compile_model(model)
    clock = Clock()
    keep_best = keras.callbacks.EarlyStopping(monitor="val_loss", patience=epochs, restore_best_weights=True)
    with quiet():
        model.fit(images("train", shuffle=True), validation_data=images("val"), epochs=epochs, verbose=0,
                  shuffle=False, callbacks=[clock, keep_best])  # the pipeline reshuffles itself
        p = model.predict(images("test").map(lambda x, y: x), verbose=0)
    pred = (p[:, 0] > 0.5).astype(int) if p.shape[1] == 1 else np.argmax(p, axis=1)
    wall = time.perf_counter() - t0
    labels = np.asarray([ds.items[i].label for i in ds.split("test")])
    return {"test": float(np.mean(pred == labels)), "wall_s": wall, "epoch_s": float(np.median(clock.secs)),
            "epochs": len(clock.secs), "fit_s": float(sum(clock.secs))}


def _show(row, key, label, m, show):
    """The section's figures of one backbone into the bench table."""
    ks = list(row["by_k"])
    kmax = ks[-1]
    g = row["guide"]
    m[f"{key}_x0"] = (row["extract_s"]["0"], "s")
    show.append((f"{label}: extraction VIEWS=0 (whole command)", f"{key}_x0"))
    if kmax != "0":
        m[f"{key}_xmax"] = (row["extract_s"][kmax], "s")
        m[f"{key}_perview"] = (row["per_view_s"], "s")
        m[f"{key}_perimage"] = (row["per_view_s"] / max(row["counts"].get("train", 0), 1) * 1e3, "ms")
        show += [(f"  extraction VIEWS={kmax} (whole command)", f"{key}_xmax"),
                 ("  extraction per view of every train image (extraction phases)", f"{key}_perview"),
                 ("  extraction per view of one image", f"{key}_perimage")]
    for k in row["cache_mib"]:
        m[f"{key}_mib{k}"] = (row["cache_mib"][k], "MiB")
        show.append((f"  cache size VIEWS={k}", f"{key}_mib{k}"))
    for k in ks:
        by = row["by_k"][k]
        for h, r in by["heads"].items():
            m[f"{key}_k{k}_{h}"] = (r["test"], "test acc")
            m[f"{key}_k{k}_{h}_wall"] = (r["wall_s"], "s" + (" (extraction estimated)" if by["estimated"] else ""))
            show += [(f"  VIEWS={k} {h}: test accuracy", f"{key}_k{k}_{h}"),
                     (f"  VIEWS={k} {h}: wall (extraction + fit)", f"{key}_k{k}_{h}_wall")]
    m[f"{key}_guide"], m[f"{key}_guide_wall"] = (g["test"], "test acc"), (g["wall_s"], "s")
    m[f"{key}_guide_epoch"] = (g["epoch_s"], "s")
    m[f"{key}_ratio"], m[f"{key}_breakeven"] = (row["ratio"], ""), (row["breakeven_epochs"], "epochs")
    show += [(f"  guide frozen+augmentation, {g['epochs']} epochs: test accuracy", f"{key}_guide"),
             ("  guide: wall (build + fit + test)", f"{key}_guide_wall"),
             ("  guide: seconds per epoch", f"{key}_guide_epoch"),
             (f"  VIEWS={kmax} dense wall / guide wall (goal <= {RATIO_GOAL})", f"{key}_ratio"),
             (f"  break-even epochs (VIEWS={kmax} extraction / guide epoch)", f"{key}_breakeven")]
