"""``caching``: one epoch of the Keras guide's way (the frozen backbone inside ``fit``) vs one epoch of the same
dense head on cached features; the ratio and the break-even number of epochs.
What a measurement needs (TensorFlow, Keras, the steps it runs) is imported lazily, in the function that
measures: ``make bench`` imports only the sections it runs."""

from __future__ import annotations

import time

import numpy as np

from pipeline.bench.common import GOALS
from pipeline.bench.report import stat


def run(ctx):
    import keras

    from pipeline.data import loading
    from pipeline.heads import dense as heads

    cfg, imgs = ctx.cfg, ctx.images()
    _, _, feats = ctx.bare()
    ds, idx = imgs.ds, list(range(imgs.n))
    labels = np.asarray([it.label for it in ds.items], np.int32)
    n_classes = len(ds.class_names)
    epochs = cfg.warmup + cfg.repeats

    class Clock(keras.callbacks.Callback):
        def __init__(ctx):
            super().__init__()
            ctx.secs = []

        def on_epoch_begin(ctx, epoch, logs=None):
            ctx.t0 = time.perf_counter()

        def on_epoch_end(ctx, epoch, logs=None):
            ctx.secs.append(time.perf_counter() - ctx.t0)

    # the guide's way: images decoded every epoch, the frozen backbone inside the trained model
    keras.utils.set_random_seed(cfg.seed)
    fx = ctx.extractor()
    inputs = keras.Input((ctx.size, ctx.size, 3), name="pixels")
    model = keras.Model(inputs, heads.build_model(int(fx.output_shape[-1]), n_classes)(fx(inputs)))
    heads.compile_model(model)
    pipe = loading.dataset(ds, idx, ctx.size, cfg.interpolation, cfg.batch, labels=True, shuffle_seed=cfg.seed)
    guide = Clock()
    model.fit(pipe, epochs=epochs, verbose=0, callbacks=[guide], shuffle=False)  # pipe reshuffles itself
    # the same dense head on the cache, fed as DenseHead feeds it: epochs timed inside one fit
    keras.utils.set_random_seed(cfg.seed)
    head = heads.compile_model(heads.build_model(feats.shape[1], n_classes))
    cached = Clock()
    head_epochs = max(epochs, 10)
    head.fit(heads.batches(feats, labels, cfg.batch, cfg.seed), epochs=head_epochs, verbose=0,
             shuffle=False, callbacks=[cached])
    g, c = stat(guide.secs[cfg.warmup:], "s"), stat(cached.secs[head_epochs - cfg.repeats:], "s")
    extract_once = (float(np.median(ctx.e2e()[0])) if "overhead" in ctx.sections
                    else len(feats) / (ctx.bare()[0] / float(np.median(ctx.bare()[1]))))
    ratio = g["median"] / c["median"]
    gain = g["median"] - c["median"]
    breakeven = extract_once / gain if gain > 0 else float("inf")
    return {"metrics": {"guide_epoch_s": g, "cached_epoch_s": c, "ratio": ratio,
                        "extract_once_s": extract_once, "breakeven_epochs": breakeven},
            "goal": GOALS["caching"], "met": ratio >= GOALS["caching"],
            "show": [("guide: fit epoch, frozen backbone inside", "guide_epoch_s"),
                     ("same dense head, epoch on the cache", "cached_epoch_s"),
                     ("ratio guide / cached (goal >= 100)", "ratio"),
                     ("extraction once (features whole run)", "extract_once_s"),
                     ("break-even epochs (extraction / saving per epoch)", "breakeven_epochs")],
            "note": f"{imgs.n} images, batch {cfg.batch}; a cached epoch is timed inside a fit of "
                    f"{head_epochs} epochs (its last {cfg.repeats}), a guide epoch inside a fit of {epochs}"}
