"""``ceiling``: this machine's float32 matmul GFLOP/s against the backbone's analytic FLOPs per image: the
fraction of the ceiling that the bare backbone and the extraction reach.
What a measurement needs (TensorFlow, Keras, the steps it runs) is imported lazily, in the function that
measures: ``make bench`` imports only the sections it runs."""

from __future__ import annotations

import numpy as np

from pipeline.bench.common import timed
from pipeline.bench.report import stat


def count_flops(model) -> int:
    """Analytic FLOPs of one image (a multiply-add counts 2) over Conv2D, DepthwiseConv2D, SeparableConv2D
    and Dense layers, nested models included; BatchNorm, activations, adds and pooling are left out."""
    import keras

    total = 0
    for layer in _leaves(model):
        kernel_sizes = [int(np.prod(w.shape)) for w in layer.weights if "kernel" in w.path.rsplit("/", 1)[-1]]
        if not kernel_sizes:
            continue
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)):
            shape = layer.output.shape
            total += 2 * int(shape[1]) * int(shape[2]) * sum(kernel_sizes)
        elif isinstance(layer, keras.layers.Dense):
            positions = int(np.prod(layer.output.shape[1:-1])) if len(layer.output.shape) > 2 else 1
            total += 2 * positions * sum(kernel_sizes)
    return total


def _leaves(model):
    for layer in model.layers:
        if getattr(layer, "layers", None):
            yield from _leaves(layer)
        else:
            yield layer



def run(ctx):
    import tensorflow as tf

    cfg, n = ctx.cfg, ctx.cfg.matmul
    rng = np.random.default_rng(0)
    a = tf.constant(rng.standard_normal((n, n), dtype=np.float32))
    b = tf.constant(rng.standard_normal((n, n), dtype=np.float32))
    mm = tf.function(lambda x, y: tf.linalg.matmul(x, y))
    calls = max(1, int(2e10 // (2 * n ** 3)))  # about 20 GFLOP per timed run

    def run():
        for _ in range(calls):
            out = mm(a, b)
        return out.numpy()[0, 0]

    secs, _ = timed(run, cfg.repeats, max(cfg.warmup, 1))
    gflops = stat([calls * 2 * n ** 3 / s / 1e9 for s in secs], "GFLOP/s")
    flops = count_flops(ctx.extractor())
    n_pass, bare_secs, _ = ctx.bare()
    bare = n_pass / float(np.median(bare_secs)) * flops / 1e9
    m = {"matmul_gflops": gflops, "gflop_per_image": (flops / 1e9, "GFLOP"),
         "bare_gflops": (bare, "GFLOP/s"), "bare_fraction": bare / gflops["median"]}
    show = [(f"float32 matmul {n}x{n}", "matmul_gflops"), ("backbone FLOPs per image", "gflop_per_image"),
            ("bare backbone reaches", "bare_gflops"), ("fraction of ceiling, bare", "bare_fraction")]
    if "overhead" in ctx.sections:
        ext = ctx.images().n / float(np.median(ctx.e2e()[1])) * flops / 1e9
        m.update(extract_gflops=(ext, "GFLOP/s"), extract_fraction=ext / gflops["median"])
        show += [("extraction reaches", "extract_gflops"), ("fraction of ceiling, extraction", "extract_fraction")]
    return {"metrics": m, "show": show,
            "note": "FLOPs counted analytically (a multiply-add = 2) over the Conv2D, DepthwiseConv2D, "
                    "SeparableConv2D and Dense layers of the built model; BatchNorm, activations, adds, "
                    "pooling and preprocessing are left out"}
