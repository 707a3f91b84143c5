"""What every bench section shares: the runner of whole commands (wall time, peak RSS), the benchmark
images, repeat timing, and the shared pieces made once per run (:class:`Context`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.memo import NAME as MEMO
from pipeline import memo, records
from pipeline.backbones import registry
from pipeline.configs import BENCH_OPT_IN, BenchConfig, FeaturesConfig, fields, narrow, replace
from pipeline.configs import BENCH_SECTIONS as SECTIONS
from pipeline.data import sources
from pipeline.data.loading import cores
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[2]
GOALS = {"overhead": 0.85,  # extraction / the combined limit of decode and the backbone
          "caching": 100.0, "memory": 1.2, "headloop": 1.5}


def sections(text):
    """The sections named, in run order: the default ones (SECTIONS), then those run only when named."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    valid = SECTIONS + BENCH_OPT_IN
    bad = [s for s in names if s not in valid]
    if bad or not names:
        raise PipelineError(f"SECTIONS={text!r}: unknown {', '.join(bad) or 'empty list'}; valid: "
                            + ", ".join(valid))
    return [s for s in valid if s in names]


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


def entry_label(backbone, alpha, weights) -> str:
    """How a table names a :func:`quality_entries` entry: backbone, its alpha (the family's default when not
    given), and the weights (``file`` for a path)."""
    alpha = alpha or registry.get(backbone).alpha
    return f"{backbone}{f' a{alpha}' if alpha else ''} ({'file' if os.path.sep in weights else weights})"


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


def run_command(argv, log_path, name) -> dict:
    """Run the command ``argv``; its wall time and its peak RSS in MiB (``ru_maxrss`` of ``os.wait4``, taken
    by a small launcher process so that this process' own peak is not inherited). ``name`` names it in a
    failure."""
    result_path = log_path + ".rusage.json"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", LAUNCHER, result_path, log_path, *argv], cwd=ROOT, env=_env(),
                   stdin=subprocess.DEVNULL, check=True)
    secs = time.perf_counter() - t0
    with open(result_path) as f:
        res = json.load(f)
    if res["code"]:
        with open(log_path) as f:
            tail = f.read()[-600:]
        raise PipelineError(f"{name} failed ({res['code']}): {tail.strip()}")
    return {"seconds": secs, "rss_mib": res["maxrss"] / (1024 if sys.platform != "darwin" else 2**20)}


def run_child(args, log_path) -> dict:
    """``python -m pipeline <args>`` through :func:`run_command`."""
    return run_command([sys.executable, "-m", "pipeline", *args], log_path, f"python -m pipeline {args[0]}")


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
                               cfg.max_pixels, os.path.join(cfg.cache_dir, MEMO),
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
                Image.fromarray(src.arrays[i]).save(os.path.splitext(dest)[0] + ".png")
            else:
                os.symlink(os.path.abspath(src.source(i)), dest)
        self.memo = os.path.join(work, f"{name}-memo.sqlite")
        t0 = time.perf_counter()
        self.ds = sources.open_source(self.root, 0.0, 0.0, 0, 0, cfg.max_pixels, self.memo, progress=False,
                                        dedupe=False)  # repeats of an image are links to one file
        self.validate_seconds = time.perf_counter() - t0
        self.n = len(self.ds.items)
        log(f"bench images: {self.n} from {cfg.data} in {self.root} (validated in {self.validate_seconds:.1f} s)")

    def fcfg(self, cfg: BenchConfig, cache_dir: str) -> FeaturesConfig:
        """The features config of these images into ``cache_dir`` (memo copied in: already validated)."""
        os.makedirs(cache_dir, exist_ok=True)
        memo.copy(self.memo, os.path.join(cache_dir, MEMO))
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


def seed_list(text, name="SEEDS") -> list[int]:
    """Distinct split seeds from a comma list; a one-line error naming the option ``name`` otherwise."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise PipelineError(f"{name}={text!r}: give distinct split seeds as a comma list, e.g. {name}=0,1,2")
    return seeds
