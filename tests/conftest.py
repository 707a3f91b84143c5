"""Shared fixtures. Real assets come from one configurable folder: $PIPELINE_SHARED, default ../shared."""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PIPELINE_SHARED") or ROOT.parent / "shared").resolve()
FLOWERS = SHARED / "datasets" / "flowers5"
MOBILENET_KERAS_FILE = SHARED / "weights" / "keras" / "models" / "mobilenet_2_5_224_tf_no_top.h5"
MOBILENET_V2_FILE = SHARED / "weights" / "mobilenet_v2_0.35_224_no_top.weights.h5"

# Keras reads KERAS_HOME once, at import: point it, before any test imports keras, at a writable folder
# whose models/ links the shared MobileNet file (Keras' cache layout) and receives the Lite0 conversion.
KERAS_HOME = Path(tempfile.mkdtemp(prefix="pipeline-keras-home-"))
(KERAS_HOME / "models").mkdir()
if MOBILENET_KERAS_FILE.exists():
    (KERAS_HOME / "models" / MOBILENET_KERAS_FILE.name).symlink_to(MOBILENET_KERAS_FILE)
os.environ["KERAS_HOME"] = str(KERAS_HOME)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `make test` runs test files in parallel processes: on a GPU each takes memory as it needs it, not all of it
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")


def require_shared():
    if not FLOWERS.is_dir():
        pytest.fail(f"shared assets missing at {SHARED}: set PIPELINE_SHARED to the folder of ../shared/README.md")


def write_image(path, color=(200, 30, 30), size=(40, 32), mode="RGB", fmt=None, seed=None):
    """A small real image file; with ``seed`` a random texture instead of a flat colour."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is not None:
        rng = np.random.default_rng(seed)
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        arr[..., 0] = np.clip(arr[..., 0].astype(int) // 2 + color[0] // 2, 0, 255)
        img = Image.fromarray(arr).convert(mode)
    else:
        img = Image.new("RGB", size, color).convert(mode)
    img.save(path, format=fmt)
    return path


def make_tree(root, classes=("cat", "dog"), per_class=12, size=(40, 32)):
    """A class-folder tree of textured images whose mean colour depends on the class."""
    colors = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (200, 200, 40), (40, 200, 200)]
    for c, cls in enumerate(classes):
        for i in range(per_class):
            write_image(Path(root) / cls / f"{cls}_{i:03d}.jpg", colors[c % len(colors)], size, seed=c * 1000 + i)
    return Path(root)


def flowers_subset(dest, per_class):
    """Symlinks to the first ``per_class`` shared flowers5 photos of each class (the originals stay untouched)."""
    require_shared()
    for cls in sorted(os.listdir(FLOWERS)):
        (Path(dest) / cls).mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(FLOWERS / cls))[:per_class]:
            (Path(dest) / cls / name).symlink_to(FLOWERS / cls / name)
    return Path(dest)


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "data")
