"""An export judged on the whole test split of its model's cache, in its own runtime (decode -> artifact ->
label): test accuracy, top-1 agreement with the float Keras model, the largest probability difference, size on
disk, latency at batch 1 and 32 (median of ``runs``, on the CPU named); and the accuracy floor (``MIN_ACCURACY``,
``MAX_DROP``) it must meet to be put in place."""

from __future__ import annotations

import os
import platform
import timeit

import numpy as np

from pipeline import artifacts as saved
from pipeline.cache import store
from pipeline.data import images, sources
from pipeline.errors import PipelineError
from pipeline.serve import runner as base

COLUMNS = ("model", "images", "accuracy", "agreement", "max_prob_diff", "MiB", "ms_batch1", "ms_batch32")


def cache_images(cache_path, key, split, size, interpolation, max_pixels=images.MAX_PIXELS, n=None, seed=None):
    """(uint8 pixels, class names) of up to ``n`` images of a cache's ``split`` (all by default; a seeded random
    choice with ``seed``), decoded as for the cache (built-in sources made again); unreadable ones are left out."""
    cache = store.load(cache_path, expect_key=key)
    sp = cache.splits.get(split) or next(iter(cache.splits.values()))
    order = np.arange(len(sp.paths))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(order)
    order = order[:n] if n is not None else order
    cfg = cache.config
    if cfg.get("data") in sources.BUILTIN:
        ds = sources.open_source(cfg["data"], cfg.get("val_fraction", 0.15), cfg.get("test_fraction", 0.15),
                                 cfg.get("seed", 0), cfg.get("per_class", 0), progress=False)
        where = {it.relpath: i for i, it in enumerate(ds.items)}
        found = [(ds.source(where[sp.paths[i]]), i) for i in order if sp.paths[i] in where]
    else:
        root = cfg.get("source_root") or cfg.get("data")
        found = [(os.path.join(root, sp.paths[i]), i) for i in order]
    pixels, names = [], []
    for s, i in found:
        try:
            pixels.append(images.load_resized(s, size, interpolation, max_pixels))
        except (images.BadImage, OSError):
            continue  # changed since the cache was made: left out
        names.append(cache.class_names[int(sp.labels[i])])
    return (np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)), names


def _cache(runner, what):
    path = runner.source.get("cache_path")
    if not path or not os.path.exists(path):
        raise PipelineError(f"{what} needs the images of the model's cache, {path or '(none recorded)'}, which is "
                            "gone: make features again with the model's options")
    return path, runner.source.get("cache_key")


def test_set(runner, what) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 pixels, label index into the model's classes, -1 for a class it lacks) of the whole test split."""
    path, key = _cache(runner, what)
    pixels, names = cache_images(path, key, "test", runner.size, runner.interpolation, runner.max_pixels)
    if not len(pixels):
        raise PipelineError(f"{what}: no readable test image in {path}")
    where = {c: i for i, c in enumerate(runner.classes)}
    return pixels, np.array([where.get(c, -1) for c in names])


def representative(runner, n: int):
    """``() -> iterator of uint8 images``: a seeded random choice of ``n`` train images of the cache, decoded once,
    when first asked for (int8 calibration)."""
    got = []

    def images_():
        if not got:
            path, key = _cache(runner, "QUANTIZE=int8")
            got.append(cache_images(path, key, "train", runner.size, runner.interpolation, runner.max_pixels,
                                    n=n, seed=0)[0])
        return iter(got[0])

    return images_


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def latency_ms(call, pixels, batch: int, runs: int) -> float:
    """Milliseconds per call on ``batch`` images (repeated to fill it), after one untimed call: the median of
    ``runs`` runs, each the mean of as many calls as last 0.2 s (:meth:`timeit.Timer.autorange`)."""
    x = np.resize(pixels, (batch, *pixels.shape[1:])).astype(np.float32)
    call(x)
    timer = timeit.Timer(lambda: call(x))
    number, _ = timer.autorange()
    return float(np.median(timer.repeat(runs, number)) / number * 1e3)


def judge(call, reference, pixels, labels, path, output, runs: int, batch: int = 32) -> dict:
    """The export's row (and the float model's accuracy) from ``call`` on the test ``pixels``."""
    got = np.concatenate([np.asarray(call(pixels[i:i + batch].astype(np.float32)))
                          for i in range(0, len(pixels), batch)])
    p, ref = base.expand(got, output), base.expand(reference, output)
    return {"images": int(len(pixels)), "accuracy": float(np.mean(p.argmax(1) == labels)),
            "float_accuracy": float(np.mean(ref.argmax(1) == labels)),
            "agreement": float(np.mean(p.argmax(1) == ref.argmax(1))),
            "max_prob_diff": float(np.max(np.abs(p - ref))), "bytes": saved.tree_bytes(path),
            "ms_batch1": latency_ms(call, pixels, 1, runs), "ms_batch32": latency_ms(call, pixels, 32, runs),
            "runs": runs, "cpu": cpu_name()}


def check_floor(row: dict, min_accuracy: float, max_drop: float, what: str) -> None:
    """A one-line PipelineError when ``row`` misses ``MIN_ACCURACY`` (a fraction) or drops more than ``MAX_DROP``
    points below the float model, saying by how much."""
    acc, drop = row["accuracy"], 100 * (row["float_accuracy"] - row["accuracy"])
    if acc < min_accuracy:
        raise PipelineError(f"{what}: test accuracy {acc:.4f} is {100 * (min_accuracy - acc):.2f} points below "
                            f"MIN_ACCURACY={min_accuracy:g} ({row['images']} images); not saved, the previous export "
                            "stays")
    if drop > max_drop:
        raise PipelineError(f"{what}: test accuracy {acc:.4f} is {drop:.2f} points below the float model's "
                            f"{row['float_accuracy']:.4f}, {drop - max_drop:.2f} more than MAX_DROP={max_drop:g} "
                            f"({row['images']} images); not saved, the previous export stays")


def rows(name: str, row: dict) -> list[list]:
    """The judgement table's rows: the float Keras model (the reference), then the export."""
    return [["float32 Keras (reference)", row["images"], round(row["float_accuracy"], 4), 1.0, 0.0, None, None, None],
            [name, row["images"], round(row["accuracy"], 4), round(row["agreement"], 4), round(row["max_prob_diff"], 4),
             round(row["bytes"] / 2**20, 2), round(row["ms_batch1"], 2), round(row["ms_batch32"], 2)]]


def table(rows_, cpu: str = "") -> str:
    """A Markdown table of the judgement rows (— where a figure does not apply)."""
    text = [[("—" if v is None else str(v)) for v in r] for r in rows_]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in text]
    return "\n".join(lines) + (f"\n\nlatency: median of the runs on {cpu}" if cpu else "")
