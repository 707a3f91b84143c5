"""What every bench section shares: the runner of whole commands (wall time, peak RSS), the benchmark
images, repeat timing, and the shared pieces made once per run (:class:`Context`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline import records
from pipeline.backbones import registry
from pipeline.configs import BENCH_SECTIONS as SECTIONS
from pipeline.configs import BenchConfig, FeaturesConfig, fields, narrow, replace
from pipeline.data import sources
from pipeline.data.loading import cores
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[2]
GOALS = {"overhead": 0.9, "caching": 100.0, "memory": 1.2}


def sections(text):
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise PipelineError(f"SECTIONS={text!r}: unknown {', '.join(bad) or 'empty list'}; valid: "
                            + ", ".join(SECTIONS))
    return [s for s in SECTIONS if s in names]


def shared_dir() -> str:
    return os.environ.get("PIPELINE_SHARED") or str(ROOT.parent / "shared")


def quality_entries(text) -> list[tuple[str, float, str]]:
    """(backbone, alpha, weights) of each ``backbone[:alpha[:weights]]`` entry."""
    out = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, alpha, weights = (entry.split(":", 2) + ["", ""])[:3]
        registry.get(name)
        try:
            a = float(alpha) if alpha else 0.0
        except ValueError:
            raise PipelineError(f"QUALITY entry {entry!r}: alpha {alpha!r} is not a number") from None
        out.append((name, a, (weights or "imagenet").replace("{shared}", shared_dir())))
    return out


def features_args(fcfg: FeaturesConfig) -> list[str]:
    """NAME=value arguments of ``python -m pipeline features`` for ``fcfg``."""
    return [f"{n.upper()}={getattr(fcfg, n)}" for n in fields(FeaturesConfig)]


def features_config(cfg: BenchConfig, **changes) -> FeaturesConfig:
    return replace(narrow(cfg, FeaturesConfig), **changes)


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


# Started from a small launcher process: a child forked straight from this one would report this process'
# own peak RSS (Linux keeps the pre-exec high-water mark of a forked or vforked child in ru_maxrss).
LAUNCHER = """
import json, os, subprocess, sys
with open(sys.argv[2], "w") as out:
    proc = subprocess.Popen(sys.argv[3:], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss": usage.ru_maxrss}, f)
"""


def run_child(args, log_path) -> dict:
    """Run ``python -m pipeline <args>``; its wall time and its peak RSS in MiB (``ru_maxrss`` of
    ``os.wait4``, taken by a small launcher process so that this process' own peak is not inherited)."""
    result_path = log_path + ".rusage.json"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", LAUNCHER, result_path, log_path, sys.executable, "-m", "pipeline", *args],
                   cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, check=True)
    secs = time.perf_counter() - t0
    with open(result_path) as f:
        res = json.load(f)
    if res["code"]:
        with open(log_path) as f:
            tail = f.read()[-600:]
        raise PipelineError(f"python -m pipeline {args[0]} failed ({res['code']}): {tail.strip()}")
    rss = res["maxrss"] / 1024 if sys.platform != "darwin" else res["maxrss"] / 2**20
    return {"seconds": secs, "rss_mib": rss}


@contextlib.contextmanager
def quiet():
    """Progress bars of the measured steps go nowhere (they would garble the screen table)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class Images:
    """The N benchmark images as a class-folder tree of their own (symlinks, or PNGs of in-memory
    sources), validated once; the memo of that validation is copied into every fresh cache folder."""

    def __init__(self, cfg: BenchConfig, work: str, n: int, name: str, log):
        src = sources.open_source(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.per_class,
                               cfg.max_pixels, os.path.join(cfg.cache_dir, "checked-images.json"),
                               progress=False) if isinstance(cfg.data, str) else cfg.data
        by_class = {}
        for i in sorted(range(len(src.items)), key=lambda i: records.digest(src.items[i].relpath)):
            by_class.setdefault(src.items[i].label, []).append(i)
        order = [i for group in zip(*by_class.values()) for i in group]  # round robin over classes
        taken = set(order)
        order = order + [i for i in range(len(src.items)) if i not in taken]
        if len(by_class) < 2:
            raise PipelineError("bench needs at least two classes")
        self.root = os.path.join(work, name)
        for k in range(n):
            i = order[k % len(order)]
            it = src.items[i]
            rep = k // len(order)
            base = it.relpath.replace(os.sep, "__")
            dest = os.path.join(self.root, src.class_names[it.label], (f"r{rep}_" if rep else "") + base)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if src.arrays is not None:
                from PIL import Image

                Image.fromarray(src.arrays[i]).save(os.path.splitext(dest)[0] + ".png")
            else:
                os.symlink(os.path.abspath(src.source(i)), dest)
        self.memo = os.path.join(work, f"{name}-checked.json")
        t0 = time.perf_counter()
        self.ds = sources.open_source(self.root, 0.0, 0.0, 0, 0, cfg.max_pixels, self.memo, progress=False)
        self.validate_seconds = time.perf_counter() - t0
        self.n = len(self.ds.items)
        log(f"bench images: {self.n} from {cfg.data} in {self.root} (validated in {self.validate_seconds:.1f} s)")

    def fcfg(self, cfg: BenchConfig, cache_dir: str) -> FeaturesConfig:
        """The features config of these images into ``cache_dir`` (memo copied in: already validated)."""
        os.makedirs(cache_dir, exist_ok=True)
        if os.path.exists(self.memo):
            shutil.copy(self.memo, os.path.join(cache_dir, "checked-images.json"))
        return features_config(cfg, data=self.root, cache_dir=cache_dir, val_fraction=0.0, test_fraction=0.0,
                               per_class=0)

    def arrays(self, size, interpolation):
        with ThreadPoolExecutor(cores()) as pool:
            return np.stack(list(pool.map(lambda i: self.ds.load(i, size, interpolation), range(self.n))))


def timed(fn, repeats, warmup):
    """fn() run warmup + repeats times; the seconds of the timed runs and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        secs.append(time.perf_counter() - t0)
    return secs, out


def load_average():
    """1-minute load average: other processes on the machine skew every figure."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None




class Context:
    """The config, the work folder and the pieces sections share, each made once when first needed."""

    def __init__(self, cfg: BenchConfig, log=print):
        if cfg.n < 2 or cfg.repeats < 1 or cfg.warmup < 0 or cfg.memory_factor < 1:
            raise PipelineError("N >= 2, REPEATS >= 1, WARMUP >= 0 and MEMORY_FACTOR >= 1 are needed")
        if cfg.batch < 1:
            raise PipelineError("BATCH must be positive")
        self.cfg, self.log = cfg, log
        self.sections = sections(cfg.sections)
        self.spec = registry.get(cfg.backbone)
        self.size = registry.resolve_size(self.spec, cfg.size)
        if "quality" in self.sections:
            self.quality = quality_entries(cfg.quality)
        records.use_keras_home(cfg.keras_home)
        self.work = tempfile.mkdtemp(prefix="pipeline-bench-")
        self.results, self.cache = {}, {}

    # -- shared pieces, made once when a section first needs them
    def images(self) -> Images:
        if "images" not in self.cache:
            self.cache["images"] = Images(self.cfg, self.work, self.cfg.n, "images", self.log)
        return self.cache["images"]

    def extractor(self):
        if "model" not in self.cache:
            from pipeline.backbones import extractor

            cfg = self.cfg
            model, _ = extractor.build(self.spec, self.size, cfg.weights, cfg.pooling, alpha=cfg.alpha or None,
                                       seed=cfg.seed, precision=cfg.precision, keras_home=cfg.keras_home)
            self.cache["model"] = model
        return self.cache["model"]

    def pixels(self):
        if "pixels" not in self.cache:
            self.cache["pixels"] = self.images().arrays(self.size, self.cfg.interpolation)
        return self.cache["pixels"]

    def inference(self, folded=False):
        """The extractor's inference function, as extraction makes it when ``folded``; made once."""
        key = "inference_folded" if folded else "inference"
        if key not in self.cache:
            from pipeline.backbones import extractor

            self.cache[key] = extractor.inference(self.extractor(), fold=folded)
        return self.cache[key]

    def folds(self) -> int:
        """How many BatchNorm layers extraction folds (none in reduced precision)."""
        return self.inference(folded=True).folds

    def bare_pass(self, folded=False):
        """(images per pass, pass()) of the compiled call on the N images already in memory; pass() returns
        their features. ``folded``: the same call with BatchNorm folded, as extraction makes it."""
        key = "bare_pass_folded" if folded else "bare_pass"
        if key not in self.cache:
            import tensorflow as tf

            cfg, x = self.cfg, self.pixels()
            b = cfg.batch
            spec = tf.TensorSpec((b, self.size, self.size, 3), tf.uint8)
            call = tf.function(self.inference(folded), input_signature=[spec])
            n_batches = -(-len(x) // b)
            idx = np.arange(n_batches * b) % len(x)  # a last short batch is filled up cyclically
            batches = [tf.constant(x[idx[i * b:(i + 1) * b]]) for i in range(n_batches)]

            def one_pass():
                return np.concatenate([call(t).numpy() for t in batches])[:len(x)]

            self.cache[key] = (n_batches * b, one_pass)
        return self.cache[key]

    def bare(self):
        """(images per timed pass, seconds per pass, features of the N images) of the compiled call."""
        if "bare" not in self.cache:
            n_pass, one_pass = self.bare_pass()
            secs, feats = timed(one_pass, self.cfg.repeats, max(self.cfg.warmup, 1))
            self.cache["bare"] = (n_pass, secs, feats)
        return self.cache["bare"]

    def e2e(self, paired=False):
        """Seconds of the whole features run and of its extraction phase, per repeat, fresh cache each.
        ``paired``: each run follows a timed bare pass (``self.cache["bare"]``) and, when extraction folds
        BatchNorm, a timed pass of the folded call (``self.cache["bare_folded"]``), so that the figures of a
        repeat see the same load from other processes."""
        if "e2e" not in self.cache:
            from pipeline.cache import extract as features

            imgs, totals, extracts, plans, paths = self.images(), [], [], [], []

            def one(k):
                fcfg = imgs.fcfg(self.cfg, os.path.join(self.work, f"e2e-{k}"))
                t0 = time.perf_counter()
                with quiet():
                    plan = features.Plan(fcfg, log=lambda m: None)
                    if plan.up_to_date():
                        raise PipelineError(f"{plan.path}: unexpectedly up to date")
                    t1 = time.perf_counter()
                    path = features.extract(plan)
                t2 = time.perf_counter()
                st = getattr(plan, "stats", None) or {}
                steady = None
                if st.get("images", 0) > st.get("startup_images", 0) and st.get("seconds", 0) > st["startup_seconds"]:
                    steady = ((st["images"] - st["startup_images"]) / (st["seconds"] - st["startup_seconds"]),
                              st["startup_seconds"])
                return t2 - t0, t2 - t1, t1 - t0, path, fcfg, steady

            steadies, bare_secs, folded_secs, feats = [], [], [], None
            folding = paired and self.cfg.fold_batchnorm and self.folds() > 0
            if paired:
                n_pass, one_pass = self.bare_pass()
                folded_pass = self.bare_pass(folded=True)[1] if folding else None
                for _ in range(max(self.cfg.warmup, 1)):
                    feats = one_pass()
                    if folding:
                        folded_pass()
            for k in range(self.cfg.warmup + self.cfg.repeats):
                if paired and k >= self.cfg.warmup:
                    t0 = time.perf_counter()
                    feats = one_pass()
                    bare_secs.append(time.perf_counter() - t0)
                    if folding:
                        t0 = time.perf_counter()
                        folded_pass()
                        folded_secs.append(time.perf_counter() - t0)
                total, ext, plan_s, path, fcfg, steady = one(k)
                if k >= self.cfg.warmup:
                    totals.append(total), extracts.append(ext), plans.append(plan_s), paths.append((path, fcfg))
                    if steady:
                        steadies.append(steady)
            self.cache["e2e"] = (totals, extracts, plans, paths)
            self.cache["steady"] = steadies
            if paired:
                self.cache["bare"] = (n_pass, bare_secs, feats)
            if folding:
                self.cache["bare_folded"] = folded_secs
        return self.cache["e2e"]
