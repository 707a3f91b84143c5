"""The GPU check (``scripts/gpu_check.sh``): the card and driver, whether TensorFlow sees it, the bare backbone's
and the whole extraction's throughput for each backbone, batch and precision, the ratio of the two (which side
limits), the decode rate per CPU core, and one fine-tune epoch's time; printed and written as JSON.

Without a GPU it measures the CPU figures only (the decode rate), says so in one line and succeeds.
``python -m pipeline.bench.gpu [--n N] [--per-class K] [--out DIR]``; ``OUT`` is the default folder.
TensorFlow is imported lazily: the decode figures and the "no GPU" answer must not wait for it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline import memo, quiet
from pipeline.bench.common import ROOT, shared_dir
from pipeline.data import sources
from pipeline.data.loading import cores

BACKBONES = {  # name -> the features options that pick it
    "mobilenet_v2": {"ALPHA": "0.35", "WEIGHTS": "{shared}/weights/mobilenet_v2_0.35_224_no_top.weights.h5"},
    "efficientnet_lite0": {"WEIGHTS": "imagenet"},
}
BATCHES = (64, 256)
PRECISIONS = ("float32", "float16")
SIZE = 224
DEADLINE = 7 * 60  # seconds: figures not begun by then are left out (the script must end within 8 minutes)
RATE = re.compile(r"\(([0-9.]+) img/s\)")
EPOCH = re.compile(r"^\s*\d+/\d+ - ([0-9.]+)(ms|s) ", re.M)


def gpu_info() -> list[dict] | None:
    """Every NVIDIA card nvidia-smi lists (name, driver, memory), or None when there is none or no nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    cards = [{"name": r[0], "driver": r[1], "memory": r[2]} for r in rows if len(r) == 3]
    return cards if out.returncode == 0 and cards else None


def tensorflow_gpus() -> list[str]:
    """The GPUs TensorFlow sees (empty: it runs on the CPU)."""
    tf = quiet.tensorflow()

    return [d.name for d in tf.config.list_physical_devices("GPU")]


def data_dir() -> str:
    return os.path.join(shared_dir(), "datasets", "flowers5")


def options(name: str) -> dict:
    """The features options of backbone ``name`` (``{shared}`` resolved)."""
    return {"BACKBONE": name, **{k: v.replace("{shared}", shared_dir()) for k, v in BACKBONES[name].items()}}


def decode_rate(n: int) -> dict:
    """Images decoded and resized to SIZE per second over ``n`` JPEGs of flowers5 (the extraction's decode,
    :meth:`pipeline.data.sources.Source.load`), on one thread and on one thread per core."""
    ds = sources.open_source(data_dir(), 0.0, 0.0, 0, -(-n // 5), progress=False, dedupe=False)
    items = [i % len(ds.items) for i in range(n)]
    load = lambda i: ds.load(i, SIZE, "bilinear")  # noqa: E731
    t0 = time.perf_counter()
    for i in items[: max(1, n // 4)]:
        load(i)
    one = max(1, n // 4) / (time.perf_counter() - t0)
    k = cores()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(k) as pool:
        list(pool.map(load, items))
    every = n / (time.perf_counter() - t0)
    return {"images": n, "cores": k, "one_thread": one, "all_cores": every, "per_core": every / k}


def backbone_rate(name: str, batch: int, precision: str, n: int) -> float:
    """Images per second of the bare compiled extractor call (BatchNorm folded as extraction does) on
    synthetic uint8 batches already on the device, after one untimed call."""
    import tensorflow as tf

    from pipeline.backbones import extractor, registry

    opts = options(name)
    spec = registry.get(name)
    model, _ = extractor.build(spec, SIZE, opts["WEIGHTS"], "avg", alpha=float(opts.get("ALPHA", 0)) or None,
                               precision=precision)
    call = extractor.compiled_call(model, SIZE, fold=True)
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8))
    call(x).numpy()
    calls = max(1, -(-n // batch))
    t0 = time.perf_counter()
    for _ in range(calls):
        out = call(x)
    out.numpy()
    return calls * batch / (time.perf_counter() - t0)


def run_pipeline(args: list[str], timeout: float) -> tuple[str, float]:
    """``python -m pipeline <args>`` from the project root: its output and wall seconds; a failure raises
    RuntimeError with the output's tail."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    if p.returncode:
        raise RuntimeError(f"python -m pipeline {args[0]} failed ({p.returncode}): {out.strip()[-400:]}")
    return out, time.perf_counter() - t0


def extraction_rate(name, batch, precision, per_class, work, timeout=300.0) -> float:
    """The img/s that ``python -m pipeline features`` logs for its extraction (decode included) of flowers5 into
    a fresh cache folder under ``work`` (the images' validation memo copied in from the first run)."""
    seen = os.path.join(work, "memo.sqlite")
    cache_dir = tempfile.mkdtemp(prefix="cache-", dir=work)
    memo.copy(seen, os.path.join(cache_dir, memo.NAME))
    opts = {**options(name), "DATA": data_dir(), "SIZE": SIZE, "BATCH": batch, "PRECISION": precision,
            "PER_CLASS": per_class, "CACHE_DIR": cache_dir}
    out, _ = run_pipeline(["features", *(f"{k}={v}" for k, v in opts.items())], timeout)
    if not os.path.exists(seen):
        memo.copy(os.path.join(cache_dir, memo.NAME), seen)
    shutil.rmtree(cache_dir, ignore_errors=True)
    found = RATE.findall(out)
    if not found:
        raise RuntimeError(f"no img/s in the log of features: {out.strip()[-300:]}")
    return float(found[-1])


def finetune_epoch(per_class: int, work: str, timeout=300.0) -> dict:
    """One fine-tune epoch of mobilenet_v2 on ``per_class`` images a class of flowers5: the epoch's seconds as
    Keras logs them (None when it logged none) and the whole command's."""
    opts = {**options("mobilenet_v2"), "DATA": data_dir(), "SIZE": SIZE, "PER_CLASS": per_class,
            "FINETUNE_EPOCHS": 1, "VERBOSE": 2, "CACHE_DIR": os.path.join(work, "ft-cache"),
            "MODELS_DIR": os.path.join(work, "ft-models"), "REPORTS_DIR": os.path.join(work, "ft-reports")}
    out, secs = run_pipeline(["finetune", *(f"{k}={v}" for k, v in opts.items())], timeout)
    epochs = [float(v) / (1000 if unit == "ms" else 1) for v, unit in EPOCH.findall(out)]
    return {"images_per_class": per_class, "epoch_seconds": epochs[-1] if epochs else None, "command_seconds": secs}


def verdict(whole: float, decode: float, backbone: float) -> dict:
    """Whole extraction against the slower of decode (all cores) and the bare backbone: which side limits."""
    limit = min(decode, backbone)
    return {"ratio": whole / limit, "bound": "decode" if decode <= backbone else "backbone"}


def gpu_figures(n: int, per_class: int, decode: float, work: str, start: float, log) -> dict:
    """For each backbone, batch and precision: the bare backbone's and the whole extraction's img/s and their
    verdict against ``decode``; a figure not begun by DEADLINE seconds after ``start`` is left out."""
    rows, left_out = [], []
    for name in BACKBONES:
        for precision in PRECISIONS:
            for batch in BATCHES:
                label = f"{name} batch {batch} {precision}"
                if time.perf_counter() - start > DEADLINE:
                    left_out.append(label)
                    continue
                try:
                    bare = backbone_rate(name, batch, precision, n)
                    whole = extraction_rate(name, batch, precision, per_class, work)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    rows.append({"backbone": name, "batch": batch, "precision": precision, "error": str(e)})
                    log(f"{label}: failed: {str(e).splitlines()[0]}")
                    continue
                row = {"backbone": name, "batch": batch, "precision": precision, "backbone_img_s": bare,
                       "extraction_img_s": whole, **verdict(whole, decode, bare)}
                rows.append(row)
                log(f"{label}: backbone {bare:.0f} img/s, whole extraction {whole:.0f} img/s, "
                    f"{row['ratio']:.2f} of the {row['bound']} limit")
    return {"throughput": rows, "left_out": left_out}


def collect(n: int, per_class: int, log=print) -> dict:
    """Every figure of the check (the CPU ones only without a GPU)."""
    start = time.perf_counter()
    cards = gpu_info()
    result = {"gpus": cards, "cpu_cores": cores(), "size": SIZE, "n": n}
    decode = decode_rate(n)
    result["decode"] = decode
    log(f"decode + resize to {SIZE}: {decode['all_cores']:.0f} img/s on {decode['cores']} cores "
        f"({decode['per_core']:.0f} per core, {decode['one_thread']:.0f} on one thread)")
    result["tensorflow_gpus"] = tensorflow_gpus()
    if not cards:
        result["verdict"] = "no NVIDIA GPU"
        return result
    log(f"GPU: {', '.join(c['name'] + ' (driver ' + c['driver'] + ', ' + c['memory'] + ')' for c in cards)}; "
        f"TensorFlow sees {len(result['tensorflow_gpus'])}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        result.update(gpu_figures(n, per_class, decode["all_cores"], work, start, log))
        if time.perf_counter() - start <= DEADLINE:
            try:
                result["finetune"] = finetune_epoch(min(per_class or 100, 100), work)
                log(f"one fine-tune epoch: {result['finetune']['epoch_seconds']} s")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                result["finetune"] = {"error": str(e)}
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024, help="images for the decode and bare-backbone figures")
    p.add_argument("--per-class", type=int, default=0, help="extraction: images a class of flowers5 (0 = all)")
    p.add_argument("--out", default=os.environ.get("OUT") or "reports", help="folder of gpu-check.json")
    a = p.parse_args(argv)
    result = collect(max(1, a.n), a.per_class)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "gpu-check.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    if not result["gpus"]:
        print("no NVIDIA GPU on this machine (nvidia-smi finds none): CPU figures only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
