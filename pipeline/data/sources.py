"""Image sources: scan and validate once, a manifest of content hashes, a stable stratified split.

A source is either a class-folder tree (optionally with separate ``train``/``val``/``test`` trees) or a
built-in in-memory set (``digits``). Raw files are only ever read.

scikit-learn (the digits) is imported lazily: scanning a tree does not need it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from pipeline.data import images
from pipeline.data.check import CheckMemo, check_files
from pipeline.data.split import SPLITS, check_classes, fill_splits, limit_per_class, split_of
from pipeline.data.walk import Walker, class_dirs
from pipeline.errors import PipelineError

SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val",
              "validation": "val", "test": "test", "testing": "test"}
BUILTIN = ("digits",)


@dataclass(frozen=True)
class Item:
    """One image: where it is (relative), what it is (content hash), its class and split."""

    relpath: str
    sha256: str
    label: int
    split: str


@dataclass
class Dataset:
    """A validated, split image set. ``load(i, size, interpolation)`` returns item i's pixels."""

    name: str
    root: str | None
    class_names: list[str]
    items: list[Item]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0
    arrays: np.ndarray | None = None  # in-memory sources
    max_pixels: int = images.MAX_PIXELS  # the scan's limit, applied again at every load
    bad: dict = field(default_factory=dict)  # relpath -> why decoding it failed: in the manifest, rows skipped

    def split(self, name, all_rows=False):
        """Indices of the split's items; without ``all_rows``, not those whose decode failed."""
        return [i for i, it in enumerate(self.items)
                if it.split == name and (all_rows or it.relpath not in self.bad)]

    def refused(self) -> list[tuple[str, str]]:
        """(relpath, reason) of every file left out: at the scan, and those whose pixels did not decode."""
        return sorted([*self.skipped, *self.bad.items()])

    def splits(self):
        return [s for s in SPLITS if any(it.split == s for it in self.items)]

    def manifest_digest(self) -> str:
        """Hash of every (relative path, content hash, label, split) and the class names."""
        h = hashlib.sha256(json.dumps(self.class_names).encode())
        for it in self.items:
            h.update(f"{it.relpath}\0{it.sha256}\0{it.label}\0{it.split}\n".encode())
        return h.hexdigest()

    def source(self, i):
        """What :func:`images.load_resized` takes for item i: a path or an array."""
        if self.arrays is not None:
            return self.arrays[i]
        return os.path.join(self.root, self.items[i].relpath)

    def load(self, i, size, interpolation="bilinear"):
        return images.load_resized(self.source(i), size, interpolation, self.max_pixels)


def scan_tree(root, val_fraction=0.15, test_fraction=0.15, seed=0, per_class=0,
              max_pixels=images.MAX_PIXELS, memo_path=None, progress=True, dedupe=True) -> Dataset:
    """Scan a class-folder tree (or train/val/test trees), validate every image, split it. Links are
    followed but never in a loop nor across class folders; ``dedupe``: a real file is one row however
    many paths reach it (the others are listed in ``skipped``)."""
    if not os.path.isdir(root):
        raise PipelineError(f"DATA={root}: no such folder; give a class-folder tree "
                            f"(one sub-folder per class) or one of: {', '.join(BUILTIN)}")
    walker, candidates, fixed_split, class_names, split_trees = _walk_classes(root, dedupe)
    skipped, kept = list(walker.skipped), []
    supported = tuple("." + e for e in images.IMAGE_EXTENSIONS)
    to_check = []
    for rel, path in candidates:
        if not rel.lower().endswith(supported):
            skipped.append((rel, f"not an image file extension ({os.path.splitext(rel)[1] or 'none'})"))
        else:
            to_check.append((rel, path))
    checked = check_files(to_check, CheckMemo(memo_path, max_pixels), progress)
    index = {c: i for i, c in enumerate(class_names)}
    bad = {}
    for rel, _ in to_check:
        sha, reason, undecodable = checked[rel]
        if reason:
            skipped.append((rel, reason))
            continue
        if undecodable:
            bad[rel] = undecodable
        parts = rel.split(os.sep)
        cls = parts[1] if split_trees else parts[0]
        split = fixed_split[rel] or split_of(rel, seed, val_fraction, test_fraction)
        kept.append(Item(rel, sha, index[cls], split))
    if not split_trees:
        kept = fill_splits(kept, seed, val_fraction, test_fraction)
    kept = [kept[i] for i in limit_per_class(kept, per_class, seed)]
    kept_paths = {it.relpath for it in kept}
    ds = Dataset(os.path.basename(os.path.normpath(root)), os.path.abspath(root), class_names, kept, sorted(skipped),
                 walker.ignored, max_pixels=max_pixels, bad={r: why for r, why in bad.items() if r in kept_paths})
    check_classes(ds, val_fraction, test_fraction, split_trees, root)
    return ds


def _walk_classes(root, dedupe):
    """(walker, [(relpath, path)] of every file under a class folder, {relpath: its split folder's split or
    None}, class names, whether ``root`` holds split trees); one-line errors for a tree that is not one."""
    tops = class_dirs(root)
    split_trees = bool(tops) and all(d.lower() in SPLIT_DIRS for d in tops)
    trees = [(d, SPLIT_DIRS[d.lower()]) for d in tops] if split_trees else [("", None)]
    class_sets = {sub: class_dirs(os.path.join(root, sub)) for sub, _ in trees}
    walker = Walker(root, [os.path.join(root, sub, c) for sub, cs in class_sets.items() for c in cs], dedupe)
    for sub in ("", *class_sets):  # the root and the split trees: a link back into them is a loop
        walker.claim(os.path.join(root, sub))
    candidates, fixed_split = [], {}
    for sub, split in trees:
        for cls in class_sets[sub]:
            for rel, path in walker.walk(os.path.join(root, sub, cls), os.path.join(sub, cls)):
                candidates.append((rel, path))
                fixed_split[rel] = split
    class_names = sorted(set().union(*class_sets.values())) if class_sets else []
    if split_trees:
        for sub, classes in class_sets.items():
            missing = sorted(set(class_names) - set(classes))
            if missing:
                raise PipelineError(f"DATA={root}: split folder {sub!r} has no folder for class(es) "
                                    f"{', '.join(missing)}; every split needs every class")
    if len(class_names) < 2:
        raise PipelineError(f"DATA={root}: found {len(class_names)} class folder(s); "
                            "a classifier needs at least 2 (one sub-folder per class)")
    return walker, candidates, fixed_split, class_names, split_trees


def digits(val_fraction=0.15, test_fraction=0.15, seed=0, per_class=0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images) as RGB uint8, for offline runs."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    arrays = np.repeat(pixels[..., None], 3, axis=-1)
    items = []
    for i, (img, y) in enumerate(zip(arrays, d.target)):
        rel = f"digits/{i:04d}"
        items.append(Item(rel, hashlib.sha256(img.tobytes()).hexdigest(), int(y),
                          split_of(rel, seed, val_fraction, test_fraction)))
    items = fill_splits(items, seed, val_fraction, test_fraction)
    keep_idx = limit_per_class(items, per_class, seed)
    ds = Dataset("digits", None, [str(c) for c in d.target_names], [items[i] for i in keep_idx],
                 arrays=arrays[keep_idx])
    check_classes(ds, val_fraction, test_fraction, False, "digits")
    return ds


def open_source(data, val_fraction=0.15, test_fraction=0.15, seed=0, per_class=0,
                max_pixels=images.MAX_PIXELS, memo_path=None, progress=True, dedupe=True) -> Dataset:
    """``data`` is a folder path or the name of a built-in source."""
    for f, name in ((val_fraction, "VAL_FRACTION"), (test_fraction, "TEST_FRACTION")):
        if not 0 <= f < 1:
            raise PipelineError(f"{name}={f}: must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise PipelineError("VAL_FRACTION + TEST_FRACTION must be below 1 (the rest is training data)")
    if per_class < 0:
        raise PipelineError(f"PER_CLASS={per_class}: must be 0 (all images) or a positive number per class")
    if max_pixels < 1:
        raise PipelineError(f"MAX_PIXELS={max_pixels}: must be at least 1 (default {images.MAX_PIXELS})")
    if data in BUILTIN:
        return digits(val_fraction, test_fraction, seed, per_class)
    if os.path.sep not in data and not os.path.exists(data):
        raise PipelineError(f"DATA={data}: not a folder nor a built-in source; valid built-ins: "
                            f"{', '.join(BUILTIN)}, or a path to a class-folder tree")
    return scan_tree(data, val_fraction, test_fraction, seed, per_class, max_pixels, memo_path, progress, dedupe)
