"""The scale section's extraction part: synthetic class-folder JPEG trees of 10^3, 10^4 and 10^5 small images
(powers of ten from 1/100 of min(SCALE_MAX, SCALE_IMAGES_MAX) up to it), each run through ``python -m pipeline
features`` (what ``make features`` runs) as a whole command with the bench's backbone options into a fresh cache
folder: peak RSS from ``os.wait4``, and the extraction's own rate from the step's log (its summary line: decode,
backbone and write, start-up included; its progress lines: the steady rate after the first batch). The steady
rate means decode and backbone together only on a tree much larger than the decode-ahead: on a smaller one
the whole tree is decoded while the backbone is still being traced, and what follows is the backbone alone."""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from pipeline.bench.common import GOALS, features_args, features_config, run_child
from pipeline.bench.report import stat
from pipeline.cache.engine import ahead_batches
from pipeline.data.loading import cores
from pipeline.errors import PipelineError

CLASSES, SIDE, QUALITY = 4, 64, 90
GOAL = 0.9  # extraction rate at the largest tree / at the smallest, at least
BEYOND = 4  # a tree's steady rate counts when it holds this many times the images decoded ahead
SUMMARY = re.compile(r"(\d+) images in [0-9.]+ s \(([0-9.]+) img/s\)")
PROGRESS = re.compile(r"^(\d+)/\d+ images \(([0-9.]+) image/s\)", re.M)


def sizes(cfg) -> list[int]:
    """The tree sizes: powers of ten from 1/100 of the cap (min of SCALE_MAX and SCALE_IMAGES_MAX) up to it."""
    cap = min(cfg.scale_max, cfg.scale_images_max)
    return [10 ** k for k in range(1, 8) if cap / 100 <= 10 ** k <= cap] if cfg.scale_images_max else []


def check(cfg) -> None:
    if cfg.scale_images_max and not sizes(cfg):
        raise PipelineError(f"SCALE_IMAGES_MAX={cfg.scale_images_max}: 0 (no JPEG trees) or at least 10")


def image(c: int, i: int, seed: int = 0) -> np.ndarray:
    """Image ``i`` of class ``c`` (SIDE x SIDE RGB): the class's colour gradient plus the image's own noise."""
    ramp = np.linspace(0, 1, SIDE, dtype=np.float32)
    base = np.stack([np.add.outer(ramp, ramp) * 60 * (1 + (c + k) % 3) for k in range(3)], axis=-1)
    noise = np.random.default_rng([seed, c, i]).integers(-40, 41, base.shape)
    return np.clip(base + 40 * c + noise, 0, 255).astype(np.uint8)


def write_tree(root: str, n: int, seed: int = 0) -> str:
    """A class-folder tree of ``n`` JPEGs (CLASSES folders) at ``root``, written once: a tree marked complete
    (``root + '.complete'``) is reused as it is. Returns ``root``."""
    marker = root + ".complete"
    if os.path.exists(marker):
        return root
    for c in range(CLASSES):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)

    def save(i):
        c = i % CLASSES
        Image.fromarray(image(c, i, seed)).save(os.path.join(root, f"class{c}", f"img_{i:07d}.jpg"),
                                                quality=QUALITY)

    with ThreadPoolExecutor(cores()) as pool:
        list(pool.map(save, range(n), chunksize=256))
    with open(marker, "w") as f:
        f.write(str(n))
    return root


def parse(log_text: str) -> dict:
    """The extraction figures the features step logs: images, their rate (start-up included) and seconds, and
    the steady rate between its first progress line (after the first batch) and its last (None when it logged
    a single batch)."""
    found = SUMMARY.findall(log_text)
    if not found:
        raise PipelineError(f"no extraction summary in the log of features: {log_text.strip()[-300:]}")
    images, ips = int(found[-1][0]), float(found[-1][1])
    lines = [(int(a), float(b)) for a, b in PROGRESS.findall(log_text)]
    steady = None
    if len(lines) >= 2 and lines[-1][0] > lines[0][0] and lines[0][1] > 0 and lines[-1][1] > 0:
        (n1, r1), (n2, r2) = lines[0], lines[-1]
        if n2 / r2 > n1 / r1:
            steady = (n2 - n1) / (n2 / r2 - n1 / r1)
    return {"images": images, "extract_ips": ips, "extract_seconds": images / ips if ips else 0.0,
            "steady_ips": steady}


def measure(cfg, root: str, work: str) -> dict:
    """``python -m pipeline features`` of the tree ``root`` into a fresh cache folder (removed after): the whole
    command's seconds and peak RSS and :func:`parse`'s figures."""
    name = os.path.basename(root)
    cache_dir = os.path.join(work, f"{name}-cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    fcfg = features_config(cfg, data=root, cache_dir=cache_dir, per_class=0, val_fraction=0.0, test_fraction=0.0)
    log = os.path.join(work, f"{name}.features.log")
    r = run_child(["features", *features_args(fcfg)], log)
    with open(log) as f:
        r.update(parse(f.read()))
    shutil.rmtree(cache_dir, ignore_errors=True)
    return r


def figures(by_n: dict, ahead: int = 0) -> tuple[dict, list, list]:
    """(metrics, show rows, verdicts) of the trees measured ({images: :func:`measure` result}; ``ahead``:
    images decoded ahead of the backbone): per size the rates, peak RSS and wall; the ratios of the largest
    tree's medians to the smallest's, the steady rate's from the smallest tree of at least BEYOND x ``ahead``."""
    m, show, verdicts, steady_from = {}, [], [], BEYOND * ahead
    for n in sorted(by_n):
        r = by_n[n]
        m[f"extract_ips_{n}"], m[f"extract_rss_{n}"] = stat([r["extract_ips"]], "img/s"), stat([r["rss_mib"]], "MiB")
        m[f"extract_wall_{n}"] = stat([r["seconds"]], "s")
        show += [(f"extraction, {n} JPEGs (the step's own, start-up included)", f"extract_ips_{n}")]
        if r["steady_ips"]:
            m[f"steady_ips_{n}"] = stat([r["steady_ips"]], "img/s")
            what = "after the first batch" if n >= steady_from else "decoded ahead whole: the backbone alone"
            show.append((f"extraction, {n} JPEGs (steady, {what})", f"steady_ips_{n}"))
        show += [(f"features peak RSS, {n} JPEGs", f"extract_rss_{n}"),
                 (f"features wall, {n} JPEGs (whole command)", f"extract_wall_{n}")]
    goals = {"extract_ips": ("extraction rate", "start-up included", GOAL, 1),
             "steady_ips": ("steady rate", f"trees of at least {BEYOND} x the {ahead} images decoded ahead", GOAL, 1),
             "extract_rss": ("features peak RSS", "", GOALS["memory"], -1)}
    for key, (label, note, goal, sign) in goals.items():
        have = [n for n in sorted(by_n) if f"{key}_{n}" in m and (key != "steady_ips" or n >= steady_from)]
        if len(have) < 2:
            continue
        lo, hi = have[0], have[-1]
        r = m[f"{key}_ratio"] = m[f"{key}_{hi}"]["median"] / m[f"{key}_{lo}"]["median"]
        show.append((f"{label} ratio {hi} / {lo} JPEGs", f"{key}_ratio"))
        verdicts.append((f"{label} {hi} / {lo} JPEGs" + (f" ({note})" if note else ""),
                         ("met" if sign * r >= sign * goal else "NOT met")
                         + f" (goal {'>=' if sign > 0 else '<='} {goal:g}: {r:.3f})"))
    return m, show, verdicts


def run(ctx) -> dict:
    """Every tree written (reused when present) and measured: {"by_images", "metrics", "show", "verdicts"}."""
    cfg, by_n = ctx.cfg, {}
    for n in sizes(cfg):
        root = write_tree(os.path.join(ctx.work, f"jpeg-{n}"), n, cfg.seed)
        ctx.log(f"scale: features of {n} synthetic JPEGs ...")
        by_n[n] = measure(cfg, root, ctx.work)
    m, show, verdicts = figures(by_n, ahead_batches(cfg.batch, cfg.size) * cfg.batch)
    return {"by_images": by_n, "metrics": m, "show": show, "verdicts": verdicts}
