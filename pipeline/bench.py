"""``bench``: speed, memory and accuracy of the pipeline side by side, as ratios measured in one run.

Sections (``SECTIONS=``, comma list):

- ``overhead``: images/s of the bare frozen backbone (a compiled ``tf.function`` with a fixed uint8 batch
  signature, on images already in memory) vs ``features`` end to end on the same N images (the real
  ``features.Plan`` + ``features.extract`` path into a fresh cache folder each repeat: decode, resize,
  preprocessing, inference, HDF5 writing, verification and rename).
- ``caching``: one epoch of the Keras guide's way (``fit`` with the frozen backbone inside the model, images
  decoded every epoch) vs one epoch of the same dense head on cached features; ratio and break-even epochs.
- ``ceiling``: float32 matmul GFLOP/s of this machine, the backbone's FLOPs per image (analytic count) and
  the fraction of the ceiling that the bare backbone and the extraction reach.
- ``memory``: peak RSS of ``python -m pipeline features`` in a subprocess at N and MEMORY_FACTOR x N images.
- ``noop``: wall time of an unchanged ``features`` rerun, in process and as a whole command.
- ``quality``: test accuracy of the best of QUALITY_HEADS (chosen on val) on each QUALITY backbone, of
  fine-tuning (FINETUNE=1, when the ``finetune`` step exists), and of two baselines: logistic regression
  on raw pixels and BACKBONE with random weights.

Each timed figure is the median of REPEATS runs after WARMUP untimed ones; min and max are kept.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import backbones, benchreport, data, records
from pipeline.benchreport import stat
from pipeline.config import FeaturesConfig, asdict, fields, opt, replace
from pipeline.errors import PipelineError

SECTIONS = ("overhead", "caching", "ceiling", "memory", "noop", "quality")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_QUALITY = ("efficientnet_lite0::imagenet,"
                   "mobilenet_v2:0.35:{shared}/weights/mobilenet_v2_0.35_224_no_top.weights.h5,"
                   "mobilenet:0.25:{shared}/weights/keras/models/mobilenet_2_5_224_tf_no_top.h5")
GOALS = {"overhead": 0.9, "caching": 100.0, "memory": 1.2}


@dataclass(frozen=True)
class BenchConfig(FeaturesConfig):
    """Options of ``bench``: the features options pick data, backbone, size and batch; these the runs."""

    n: int = opt(512, "images for the speed sections (overhead, caching, memory, noop)")
    repeats: int = opt(3, "timed repeats of every figure (the median is reported, with min and max)")
    warmup: int = opt(1, "untimed runs before the timed ones")
    sections: str = opt(",".join(SECTIONS), "comma list of sections: " + ", ".join(SECTIONS))
    memory_factor: int = opt(10, "memory: the large run has this many times N images")
    memory_repeats: int = opt(1, "memory: runs at each size (peak RSS hardly varies; each run is a whole command)")
    matmul: int = opt(2048, "ceiling: side of the square float32 matrices multiplied")
    quality: str = opt(DEFAULT_QUALITY, "quality: comma list of backbone:alpha:weights ({shared} = the shared "
                                         "assets folder, $PIPELINE_SHARED or ../shared)")
    quality_heads: str = opt("logreg,linear_svm,dense", "quality: heads fitted on train; the best on val counts")
    raw_size: int = opt(32, "quality: side of the raw-pixel baseline's images")
    finetune: bool = opt(False, "quality: also fine-tune BACKBONE (needs the finetune step; slow)")
    finetune_args: str = opt("", "quality: more NAME=value options of the finetune step, space-separated, "
                                 "e.g. 'FINETUNE_EPOCHS=2 UNFREEZE=blocks:1'")
    reports_dir: str = opt("reports", "where bench-<date>.json and .md are written")
    tag: str = opt("", "suffix of the report names, e.g. before / after")


# ------------------------------------------------------------------------------------------- helpers

def _sections(text):
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
        backbones.get(name)
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
    return replace(FeaturesConfig(**{n: getattr(cfg, n) for n in fields(FeaturesConfig)}), **changes)


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
        src = data.open_source(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.per_class,
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
        self.ds = data.open_source(self.root, 0.0, 0.0, 0, 0, cfg.max_pixels, self.memo, progress=False)
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
        with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            return np.stack(list(pool.map(lambda i: self.ds.load(i, size, interpolation), range(self.n))))


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


def goal_images(bare_ips, steady_ips, startup_s, goal):
    """Smallest N at which N images through a run of ``startup_s`` then ``steady_ips`` take at most
    1/goal of the time the bare call takes (inf if the steady rate alone misses the goal)."""
    slack = 1 / bare_ips - goal / steady_ips  # seconds an image saves against the goal in steady state
    return math.ceil(goal * startup_s / slack - 1e-9) if slack > 0 else float("inf")


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


# ------------------------------------------------------------------------------------------- sections

class Bench:
    def __init__(self, cfg: BenchConfig, log=print):
        if cfg.n < 2 or cfg.repeats < 1 or cfg.warmup < 0 or cfg.memory_factor < 1:
            raise PipelineError("N >= 2, REPEATS >= 1, WARMUP >= 0 and MEMORY_FACTOR >= 1 are needed")
        if cfg.batch < 1:
            raise PipelineError("BATCH must be positive")
        self.cfg, self.log = cfg, log
        self.sections = _sections(cfg.sections)
        self.spec = backbones.get(cfg.backbone)
        self.size = backbones.resolve_size(self.spec, cfg.size)
        if "quality" in self.sections:
            self.quality = quality_entries(cfg.quality)
        if cfg.keras_home:
            os.environ["KERAS_HOME"] = os.path.abspath(cfg.keras_home)
        self.work = tempfile.mkdtemp(prefix="pipeline-bench-")
        self.results, self.cache = {}, {}

    # -- shared pieces, made once when a section first needs them
    def images(self) -> Images:
        if "images" not in self.cache:
            self.cache["images"] = Images(self.cfg, self.work, self.cfg.n, "images", self.log)
        return self.cache["images"]

    def extractor(self):
        if "model" not in self.cache:
            from pipeline import extractor

            cfg = self.cfg
            model, _ = extractor.build(self.spec, self.size, cfg.weights, cfg.pooling, alpha=cfg.alpha or None,
                                       seed=cfg.seed, precision=cfg.precision)
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
            from pipeline import extractor

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
            from pipeline import features

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

    def overhead(self):
        totals, extracts, plans, _ = self.e2e(paired=True)
        n_pass, secs, _ = self.bare()
        n = self.images().n
        m = {"bare_ips": stat([n_pass / s for s in secs], "img/s"),
             "extract_ips": stat([n / s for s in extracts], "img/s"),
             "run_ips": stat([n / s for s in totals], "img/s"),
             "plan_s": stat(plans, "s"),
             "validate_s": stat([self.images().validate_seconds], "s")}
        ratio = m["extract_ips"]["median"] / m["bare_ips"]["median"]
        extra, show_steady = {}, []
        if self.cache.get("steady"):
            extra = {"steady_ips": stat([s[0] for s in self.cache["steady"]], "img/s"),
                     "startup_s": stat([s[1] for s in self.cache["steady"]], "s")}
            extra["steady_ratio"] = extra["steady_ips"]["median"] / m["bare_ips"]["median"]
            extra["goal_images"] = goal_images(m["bare_ips"]["median"], extra["steady_ips"]["median"],
                                               extra["startup_s"]["median"], GOALS["overhead"])
            show_steady = [("features: after the first batch (steady)", "steady_ips"),
                           ("features: start-up (trace + first batch)", "startup_s"),
                           ("ratio steady / bare", "steady_ratio"),
                           ("images from which start-up is amortised to the goal", "goal_images")]
        paired = stat([(n / e) / (n_pass / b) for e, b in zip(extracts, secs)], "x")
        show_folded = []
        if self.cache.get("bare_folded"):
            fsecs = self.cache["bare_folded"]
            extra["folded_ips"] = stat([n_pass / s for s in fsecs], "img/s")
            extra["fold_speedup"] = stat([b / f for b, f in zip(secs, fsecs)], "x")
            extra["own_ratio"] = stat([(n / e) / (n_pass / f) for e, f in zip(extracts, fsecs)], "x")
            show_folded = [(f"bare backbone, {self.folds()} BatchNorm folded (extraction's call)", "folded_ips"),
                           ("folding speed-up of the bare call, per repeat", "fold_speedup"),
                           ("pipeline's own cost: extraction / folded call", "own_ratio")]
        return {"metrics": {**m, **extra, "ratio": ratio, "paired_ratio": paired,
                            "run_ratio": m["run_ips"]["median"] / m["bare_ips"]["median"]},
                "goal": GOALS["overhead"], "met": ratio >= GOALS["overhead"],
                "show": [("bare backbone, compiled call on arrays", "bare_ips"),
                         *show_folded,
                         ("features: extraction phase", "extract_ips"),
                         ("features: whole run (plan + extraction)", "run_ips"),
                         ("features: plan (scan, build, weights hash)", "plan_s"),
                         ("first validation of the N images (once)", "validate_s"),
                         *show_steady,
                         ("ratio extraction / bare (goal >= 0.9)", "ratio"),
                         ("same, per repeat (bare pass then run)", "paired_ratio"),
                         ("ratio whole run / bare", "run_ratio")],
                "note": "each repeat is a bare pass (and a pass of the folded call, when FOLD_BATCHNORM) "
                        "followed by a features run (all see the same load); "
                        "extraction phase = decode, resize, preprocessing, inference, HDF5 writes, verify and "
                        "rename of features.extract; the whole run adds features.Plan (scan with the validation "
                        "memo warm, model build, weights hash)"}

    def caching(self):
        import keras

        from pipeline import heads, tfdata

        cfg, imgs = self.cfg, self.images()
        _, _, feats = self.bare()
        ds, idx = imgs.ds, list(range(imgs.n))
        labels = np.asarray([it.label for it in ds.items], np.int32)
        n_classes = len(ds.class_names)
        epochs = cfg.warmup + cfg.repeats

        class Clock(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.secs = []

            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.secs.append(time.perf_counter() - self.t0)

        # the guide's way: images decoded every epoch, the frozen backbone inside the trained model
        keras.utils.set_random_seed(cfg.seed)
        fx = self.extractor()
        inputs = keras.Input((self.size, self.size, 3), name="pixels")
        model = keras.Model(inputs, heads.build_model(int(fx.output_shape[-1]), n_classes)(fx(inputs)))
        heads.compile_model(model)
        pipe = tfdata.images(ds, idx, self.size, cfg.interpolation, cfg.batch, labels=True, shuffle_seed=cfg.seed)
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
        extract_once = (float(np.median(self.e2e()[0])) if "overhead" in self.sections
                        else len(feats) / (self.bare()[0] / float(np.median(self.bare()[1]))))
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

    def ceiling(self):
        import tensorflow as tf

        cfg, n = self.cfg, self.cfg.matmul
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
        flops = count_flops(self.extractor())
        n_pass, bare_secs, _ = self.bare()
        bare = n_pass / float(np.median(bare_secs)) * flops / 1e9
        m = {"matmul_gflops": gflops, "gflop_per_image": (flops / 1e9, "GFLOP"),
             "bare_gflops": (bare, "GFLOP/s"), "bare_fraction": bare / gflops["median"]}
        show = [(f"float32 matmul {n}x{n}", "matmul_gflops"), ("backbone FLOPs per image", "gflop_per_image"),
                ("bare backbone reaches", "bare_gflops"), ("fraction of ceiling, bare", "bare_fraction")]
        if "overhead" in self.sections:
            ext = self.images().n / float(np.median(self.e2e()[1])) * flops / 1e9
            m.update(extract_gflops=(ext, "GFLOP/s"), extract_fraction=ext / gflops["median"])
            show += [("extraction reaches", "extract_gflops"), ("fraction of ceiling, extraction", "extract_fraction")]
        return {"metrics": m, "show": show,
                "note": "FLOPs counted analytically (a multiply-add = 2) over the Conv2D, DepthwiseConv2D, "
                        "SeparableConv2D and Dense layers of the built model; BatchNorm, activations, adds, "
                        "pooling and preprocessing are left out"}

    def memory(self):
        cfg, out = self.cfg, {}
        sets = {"small": self.images(), "large": (self.images() if cfg.memory_factor == 1 else
                                                  Images(cfg, self.work, cfg.n * cfg.memory_factor, "images-large",
                                                         self.log))}
        for name, imgs in sets.items():
            runs = []
            for k in range(max(cfg.memory_repeats, 1)):
                fcfg = imgs.fcfg(cfg, os.path.join(self.work, f"mem-{name}-{k}"))
                runs.append(run_child(["features", *features_args(fcfg)],
                                      os.path.join(self.work, f"mem-{name}-{k}.log")))
            out[name] = runs
            self.cache[f"mem-{name}"] = fcfg
        small, large = (stat([r["rss_mib"] for r in out[s]], "MiB") for s in ("small", "large"))
        ratio = large["median"] / small["median"]
        n_small, n_large = sets["small"].n, sets["large"].n
        return {"metrics": {"rss_small": small, "rss_large": large, "ratio": ratio,
                            "wall_small": stat([r["seconds"] for r in out["small"]], "s"),
                            "wall_large": stat([r["seconds"] for r in out["large"]], "s"),
                            "n_small": n_small, "n_large": n_large},
                "goal": GOALS["memory"], "met": ratio <= GOALS["memory"],
                "show": [(f"peak RSS, {n_small} images", "rss_small"), (f"peak RSS, {n_large} images", "rss_large"),
                         ("ratio large / small (goal <= 1.2)", "ratio"),
                         (f"wall, {n_small} images (whole command)", "wall_small"),
                         (f"wall, {n_large} images (whole command)", "wall_large")],
                "note": "python -m pipeline features in a subprocess into a fresh cache folder; peak RSS from "
                        "os.wait4 (ru_maxrss)"}

    def noop(self):
        from pipeline import features

        cfg = self.cfg
        fcfg = self.cache.get("mem-small")
        if fcfg is None:
            fcfg = self.images().fcfg(cfg, os.path.join(self.work, "noop"))
            with quiet():
                features.run(fcfg, log=lambda m: None)
        msgs = []

        def in_process():
            with quiet():
                features.run(fcfg, log=msgs.append)

        secs, _ = timed(in_process, cfg.repeats, cfg.warmup)
        if not any(m.startswith("up to date") for m in msgs):
            raise PipelineError("the unchanged rerun was not up to date")
        cmd = [run_child(["features", *features_args(fcfg)], os.path.join(self.work, f"noop-{k}.log"))["seconds"]
               for k in range(cfg.repeats)]
        with open(os.path.join(self.work, f"noop-{cfg.repeats - 1}.log")) as f:
            if "up to date" not in f.read():
                raise PipelineError("the unchanged command rerun was not up to date")
        return {"metrics": {"in_process_s": stat(secs, "s"), "command_s": stat(cmd, "s")},
                "show": [("unchanged rerun, features.run in process", "in_process_s"),
                         ("unchanged rerun, whole command", "command_s")],
                "note": "an unchanged rerun scans the images (validation memo warm), builds the backbone to "
                        "hash its weights and finds the cache up to date; the command adds Python and "
                        "TensorFlow start-up"}

    def quality_section(self):
        from pipeline import features, heads, store

        cfg = self.cfg
        names = [h.strip() for h in cfg.quality_heads.split(",") if h.strip()]
        for n in names:
            heads.get(n)
        def label(b, a, w):
            alpha = a or backbones.get(b).alpha
            return f"{b}{f' a{alpha}' if alpha else ''} ({'file' if os.path.sep in w else w})"

        entries = [(label(b, a, w), features_config(cfg, backbone=b, alpha=a, weights=w)) for b, a, w in self.quality]
        entries.append((f"{cfg.backbone} random weights (baseline)", features_config(cfg, weights="none")))
        rows, m, show = [], {}, []
        for label, fcfg in entries:
            row = {"label": label, "backbone": fcfg.backbone, "alpha": fcfg.alpha, "weights": fcfg.weights}
            try:
                with quiet():
                    cache = store.load(features.run(fcfg, log=lambda s: None))
                row.update(self._fit_heads(cache, names))
            except PipelineError as e:
                row["error"] = str(e)
                self.log(f"quality: {label}: {e}")
            rows.append(row)
        rows.append(self._raw_pixels(names))
        if cfg.finetune:
            rows.append(self._finetune())
        for i, row in enumerate(rows):
            key = f"q{i}"
            if "test" in row:
                m[key] = (row["test"], f"test acc ({row['best']})")
                m[key + "_val"] = row["val"]
            else:
                m[key] = (row.get("error", "not run")[:60], "")
            show.append((row["label"], key))
        split = rows[0].get("counts", {})
        return {"metrics": m, "rows": rows, "show": show,
                "note": f"DATA={cfg.data}, size {self.size if cfg.size == 0 else cfg.size}; heads "
                        f"{', '.join(names)} fitted on train with their defaults, the best on val reported "
                        f"on test; split sizes {split}"}

    def _fit_heads(self, cache, names):
        from pipeline import headstep

        headstep.check_splits(cache)
        return _best_head({s: (sp.features, sp.labels) for s, sp in cache.splits.items()}, names, self.cfg.seed)

    def _raw_pixels(self, names):
        cfg = self.cfg
        row = {"label": f"raw pixels {cfg.raw_size}x{cfg.raw_size} (baseline)"}
        try:
            ds = data.open_source(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.per_class,
                                  cfg.max_pixels, os.path.join(cfg.cache_dir, "checked-images.json"), progress=False)
            with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
                x = np.stack(list(pool.map(lambda i: ds.load(i, cfg.raw_size, cfg.interpolation),
                                           range(len(ds.items)))))
            x = x.reshape(len(x), -1).astype(np.float32) / 255.0
            y = np.asarray([it.label for it in ds.items], np.int32)
            splits = {s: (x[ds.split(s)], y[ds.split(s)]) for s in ds.splits()}
            row.update(_best_head(splits, ["logreg"], cfg.seed))
        except PipelineError as e:
            row["error"] = str(e)
        return row

    def _finetune(self):
        """Fine-tuning's test accuracy through the ``finetune`` step, when this installation has one."""
        import importlib.util

        from pipeline import commands

        cfg = self.cfg
        row = {"label": f"fine-tuned {cfg.backbone}"}
        if importlib.util.find_spec("pipeline.finetune") is None or "finetune" not in commands.STEPS:
            row["error"] = "not available (no finetune step in this installation)"
            return row
        step = commands.STEPS["finetune"]
        args = features_args(features_config(cfg))
        out_dir = os.path.join(self.work, "finetune")
        own = {f.upper() for f in fields(step.config)} if step.config else set()
        for name, value in (("MODELS_DIR", os.path.join(out_dir, "models")),
                            ("REPORTS_DIR", os.path.join(out_dir, "reports"))):
            if name in own:
                args.append(f"{name}={value}")
        args = [a for a in args if a.split("=", 1)[0] in own] + cfg.finetune_args.split()
        try:
            t0 = time.perf_counter()
            run_child(["finetune", *args], os.path.join(self.work, "finetune.log"))
            row["seconds"] = time.perf_counter() - t0
        except PipelineError as e:
            row["error"] = str(e)[:200]
            return row
        found = []
        for path in glob.glob(os.path.join(out_dir, "**", "*.json"), recursive=True):
            try:
                with open(path) as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                continue
            test = rec.get("test") if isinstance(rec, dict) else None
            if isinstance(test, dict) and isinstance(test.get("accuracy"), (int, float)):
                val = rec.get("val")
                found.append((os.path.sep + "finetune" + os.path.sep in path, path, test["accuracy"],
                              val.get("accuracy") if isinstance(val, dict) else None))
        if not found:
            row["error"] = "the finetune step wrote no test accuracy under its reports"
            return row
        _, path, acc, val = max(found)  # the fine-tune's own metrics, not those of the head it started from
        row.update(test=float(acc), val=val, best="finetune", heads=[{"head": "finetune", "val": val, "test": acc}],
                   report=path)
        return row

    # -- the run
    def run(self) -> dict:
        when = benchreport.now()
        cfg = self.cfg
        load_start = _load()
        import keras
        import tensorflow as tf

        self.log(f"bench: sections {', '.join(self.sections)}; {cfg.backbone} at {self.size}, batch {cfg.batch}, "
                 f"N={cfg.n}, {cfg.repeats} repeat(s) after {cfg.warmup} warm-up; work folder {self.work}")
        del keras, tf
        funcs = {"overhead": self.overhead, "caching": self.caching, "ceiling": self.ceiling,
                 "memory": self.memory, "noop": self.noop, "quality": self.quality_section}
        try:
            for name in self.sections:
                t0 = time.perf_counter()
                self.log(f"bench: {name} ...")
                try:
                    self.results[name] = funcs[name]()
                except PipelineError as e:
                    self.results[name] = {"error": str(e)}
                    self.log(f"bench: {name} failed: {e}")
                self.results[name]["seconds"] = time.perf_counter() - t0
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
        result = {"date": when.isoformat(timespec="seconds"), "machine": benchreport.machine(),
                  "load_average": {"start": load_start, "end": _load()},
                  "versions": records.versions(), "config": asdict(cfg),
                  "backbone": {"name": self.spec.name, "size": self.size, "alpha": cfg.alpha or self.spec.alpha,
                               "weights": cfg.weights, "batch": cfg.batch, "pooling": cfg.pooling,
                               "dtype": cfg.dtype},
                  "sections": self.results}
        for sec in self.results.values():
            if "met" in sec:
                sec.setdefault("verdicts", []).append(
                    ("goal", ("met" if sec["met"] else "NOT met") + f" (goal {sec['goal']})"))
        paths = benchreport.write(result, cfg.reports_dir, when, cfg.tag)
        self.log(benchreport.table(result))
        self.log(f"wrote {paths[0]} and {paths[1]}")
        result["paths"] = paths
        return result


def _load():
    """1-minute load average: other processes on the machine skew every figure."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _best_head(splits, names, seed) -> dict:
    """Each head fitted on train with its defaults; the best on val; its test accuracy."""
    from pipeline import heads

    (xt, yt), (xv, yv), (xs, ys) = splits["train"], splits["val"], splits["test"]
    out = []
    for name in names:
        est = heads.build(name, seed=seed)
        with quiet():
            if isinstance(est, heads.DenseHead):
                est.fit(xt, yt, validation_data=(xv, yv))
            else:
                est.fit(xt, yt)
        out.append({"head": name, "val": float(np.mean(est.predict(xv) == yv)),
                    "test": float(np.mean(est.predict(xs) == ys))})
    best = max(out, key=lambda h: h["val"])  # first of equals, in the order given
    return {"best": best["head"], "val": best["val"], "test": best["test"], "heads": out,
            "counts": {s: int(len(y)) for s, (_, y) in splits.items()}}


def run(cfg: BenchConfig, log=print) -> dict:
    """Measure the chosen sections, print the table, write the JSON and Markdown reports."""
    return Bench(cfg, log).run()
