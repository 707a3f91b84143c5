"""The stable stratified split: a file's split comes from a hash of its relative path, so it keeps its split
when others are added; small classes lend an image to a split that would otherwise lack them."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter

from pipeline.errors import PipelineError

SPLITS = ("train", "val", "test")


def _unit(relpath: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{relpath}".encode()).hexdigest()[:12], 16) / 16**12


def split_of(relpath: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """A file's split from a stable hash of its relative path: it keeps its split when others are added."""
    u = _unit(relpath, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def fill_splits(items, seed, val_fraction, test_fraction):
    """Items with every class present in every split that has a fraction: a class whose hash split left a
    split empty lends it the image whose hash lies nearest that split's range, from train (or, with fewer
    than 2 there, the split holding most of the class). Only small classes are touched, and only while the
    split lacks them; every other file keeps its hash split. A class with as many images as splits fills them."""
    items = list(items)
    bounds = {"test": (0.0, test_fraction), "val": (test_fraction, test_fraction + val_fraction),
              "train": (test_fraction + val_fraction, 1.0)}
    for label in sorted({it.label for it in items}):
        for s, (lo, hi) in bounds.items():
            if hi <= lo:
                continue
            mine = [i for i, it in enumerate(items) if it.label == label]
            if any(items[i].split == s for i in mine):
                continue
            by_split = {d: [i for i in mine if items[i].split == d] for d in SPLITS}
            donor = max(SPLITS, key=lambda d: (d == "train" and len(by_split[d]) >= 2, len(by_split[d])))
            if len(by_split[donor]) < 2:
                continue  # too few images: check_classes names the class
            u = {i: _unit(items[i].relpath, seed) for i in by_split[donor]}
            nearest = min(by_split[donor], key=lambda i: min(abs(u[i] - lo), abs(u[i] - hi)))
            items[nearest] = dataclasses.replace(items[nearest], split=s)
    return items


def limit_per_class(items, per_class, seed):
    """Indices of at most ``per_class`` items of each class, chosen by a stable hash, keeping the
    class's split proportions (each non-empty split keeps at least one image): for quick runs."""
    if not per_class:
        return list(range(len(items)))
    rank = sorted(range(len(items)),
                  key=lambda i: hashlib.sha256(f"limit{seed}:{items[i].relpath}".encode()).hexdigest())
    groups, per_label = {}, Counter(it.label for it in items)
    for i in rank:
        groups.setdefault((items[i].label, items[i].split), []).append(i)
    keep = set()
    for (label, _), g in groups.items():
        keep.update(g[:max(1, round(per_class * len(g) / per_label[label]))])
    return sorted(keep)


def check_classes(ds, val_fraction, test_fraction, split_trees, root):
    """Every class has an image in every split it needs: a one-line error with advice that works otherwise."""
    counts = Counter((it.split, it.label) for it in ds.items)
    for c, cls in enumerate(ds.class_names):
        if not any(counts[(s, c)] for s in SPLITS):
            raise PipelineError(f"DATA={root}: class folder {cls!r} has no usable image; "
                                "add images or remove the folder")
    wanted = [s for s, f in (("train", 1), ("val", val_fraction), ("test", test_fraction)) if f > 0 or split_trees]
    for s in wanted:
        missing = [cls for c, cls in enumerate(ds.class_names) if not counts[(s, c)]]
        if not missing:
            continue
        head = f"DATA={root}: the {s} split has no image of class(es) {', '.join(missing)}; "
        if split_trees:
            raise PipelineError(head + "add images of those classes to that split's folder")
        raise PipelineError(head + f"add images to those classes ({len(wanted)} or more each), or set "
                            "VAL_FRACTION/TEST_FRACTION to 0 for features only (make head needs val and test)")
