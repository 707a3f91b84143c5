"""A tiny real flowers5 tree for the audit's tests, with planted problems, and its cache (MobileNetV2-0.35 at
96 px from the shared weights file): train/val/test folders so that every plant lands in a known split.

Plants: label flips (a photo of one class filed under another), copies of train photos in test (the exact
file, a resized one, a re-encoded JPEG) and a handwritten digit among the flowers."""

import os
import shutil
from pathlib import Path

import numpy as np
from conftest import FLOWERS, MOBILENET_V2_FILE, require_shared
from PIL import Image

import pipeline

COUNTS = {"train": 14, "val": 4, "test": 4}
FLIPS = {("train", "daisy", "rose"): 1, ("train", "sunflower", "tulip"): 1, ("train", "tulip", "dandelion"): 1,
         ("train", "rose", "daisy"): 1, ("val", "dandelion", "sunflower"): 1}  # (split, true, filed under): n
COPIES = ("exact", "resized", "jpeg")
# flowers5's own near-duplicate among the first daisies (two frames of one scene): left out so that the tree
# without plants is clean (the audit finds it: tests/reports/test_audit_leaks.py)
GENUINE_NEAR = ("daisy/10994032453_ac7f8d9e2e.jpg", "daisy/10466290366_cc72e33532.jpg")


def photos(cls):
    return sorted(p.name for p in (FLOWERS / cls).iterdir() if f"{cls}/{p.name}" != GENUINE_NEAR[0])


def build(root, flips=True, copies=True, digit=True) -> dict:
    """The tree under ``root``; {"flips": relpaths filed under the wrong class, "true": {flip: its true class},
    "copies": {test relpath: train relpath}, "digit": its relpath}."""
    require_shared()
    root, used, planted = Path(root), {}, {"flips": [], "true": {}, "copies": {}, "digit": None}
    for cls in sorted(os.listdir(FLOWERS)):
        names, at = photos(cls), 0
        for split, n in COUNTS.items():
            for name in names[at:at + n]:
                link(root / split / cls / name, FLOWERS / cls / name)
            at += n
        used[cls] = at
    if flips:
        for (split, true, wrong), n in FLIPS.items():
            for name in photos(true)[used[true]:used[true] + n]:
                link(root / split / wrong / name, FLOWERS / true / name)
                planted["flips"].append(f"{split}/{wrong}/{name}")
                planted["true"][f"{split}/{wrong}/{name}"] = true
            used[true] += n
    if copies:
        planted["copies"] = plant_copies(root)
    if digit:
        planted["digit"] = plant_digit(root / "test" / "daisy" / "digit.png")
    return planted


def link(dest, src):
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(src)


def plant_copies(root) -> dict:
    """Three train photos copied into test: the exact file, resized (and re-encoded), re-encoded JPEG."""
    out = {}
    for kind, cls in zip(COPIES, ("daisy", "rose", "tulip")):
        name = sorted(os.listdir(root / "train" / cls))[3]
        src, dest = root / "train" / cls / name, root / "test" / cls / f"copy_{kind}.jpg"
        if kind == "exact":
            shutil.copyfile(src, dest)
        else:
            with Image.open(src) as im:
                im = im.convert("RGB")
                (im.resize((im.width * 2 // 3, im.height * 2 // 3), Image.BICUBIC) if kind == "resized"
                 else im).save(dest, format="jpeg", quality=60)
        out[f"test/{cls}/copy_{kind}.jpg"] = f"train/{cls}/{name}"
    return out


def plant_digit(dest) -> str:
    """A handwritten digit (scikit-learn's digits), grey on black, 96 x 96."""
    from sklearn.datasets import load_digits

    d = load_digits().images[7]
    pixels = (d / d.max() * 255).astype(np.uint8)
    Image.fromarray(pixels).resize((96, 96), Image.NEAREST).convert("RGB").save(dest)
    return "test/daisy/digit.png"


def cache(tree, cache_dir, size=96) -> str:
    """The tree's cache file (made when missing)."""
    return pipeline.features(data=str(tree), backbone="mobilenet_v2", alpha=0.35, weights=str(MOBILENET_V2_FILE),
                             size=size, cache_dir=str(cache_dir))


_TREES = {}


def planted(tmp_path_factory, size=96) -> tuple[str, dict]:
    """(cache path, plants) of the planted tree, built once per test session and extracted once per size."""
    if "tree" not in _TREES:
        root = tmp_path_factory.mktemp("audit-flowers")
        _TREES["tree"] = (root, build(root / "data"))
    root, plants = _TREES["tree"]
    return cache(root / "data", root / "cache", size), plants
