"""scripts/gpu_check.sh on this CPU machine (no NVIDIA GPU): its JSON and its one-line answer; and the GPU
figures' own measurements (bare backbone, whole extraction, verdict) run here on a few images."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from pipeline.bench import gpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_script_without_gpu_writes_cpu_figures_and_says_so(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    p = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--n", "8"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    said = [line for line in p.stdout.splitlines() if "no NVIDIA GPU" in line]
    assert said == ["no NVIDIA GPU on this machine (nvidia-smi finds none): CPU figures only"]
    r = json.loads((tmp_path / "gpu-check.json").read_text())
    assert r["gpus"] is None and r["tensorflow_gpus"] == [] and r["verdict"] == "no NVIDIA GPU"
    assert r["n"] == 8 and r["cpu_cores"] >= 1 and r["size"] == 224
    d = r["decode"]
    assert d["images"] == 8 and d["all_cores"] > 0 and d["one_thread"] > 0
    assert d["per_core"] == pytest.approx(d["all_cores"] / d["cores"])


@pytest.mark.slow
@pytest.mark.slow
def test_gpu_figures_measure_backbone_and_extraction(tmp_path):
    bare = gpu.backbone_rate("mobilenet_v2", 4, "float32", 8)
    whole = gpu.extraction_rate("mobilenet_v2", 8, "float32", 2, str(tmp_path))
    assert bare > 0 and whole > 0
    assert (tmp_path / "memo.sqlite").exists()  # the validation memo kept for the next runs
    v = gpu.verdict(whole, 100.0, bare)
    assert v["ratio"] == pytest.approx(whole / min(100.0, bare))
    assert v["bound"] == ("decode" if 100.0 <= bare else "backbone")


def test_verdict_names_the_slower_side():
    assert gpu.verdict(90.0, 100.0, 400.0) == {"ratio": 0.9, "bound": "decode"}
    assert gpu.verdict(45.0, 100.0, 50.0) == {"ratio": 0.9, "bound": "backbone"}
