"""Image sources: scan and validate once, a manifest of content hashes, a stable stratified split.

A source is either a class-folder tree (optionally with separate ``train``/``val``/``test`` trees) or a
built-in in-memory set (``digits``). Raw files are only ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline.data import images
from pipeline.data.loading import cores
from pipeline.data.split import SPLITS, check_classes, fill_splits, limit_per_class, split_of
from pipeline.errors import PipelineError
from pipeline.records import atomic_write_text, file_digest

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

    def split(self, name):
        return [i for i, it in enumerate(self.items) if it.split == name]

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
        return images.load_resized(self.source(i), size, interpolation)


def _walk_files(top):
    """Yield (relpath, path) of every file below ``top``, following symlinks without looping."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            yield os.path.relpath(path, top), path


def _class_dirs(top):
    return sorted(d for d in os.listdir(top)
                  if os.path.isdir(os.path.join(top, d)) and not images.is_hidden(d))


class _CheckMemo:
    """Validation results by content hash, kept beside the cache: every image is decoded to check it once."""

    def __init__(self, path, max_pixels):
        self.path, self.max_pixels = path, max_pixels
        self.memo = {}
        if path:
            try:
                with open(path) as f:
                    self.memo = json.load(f)
            except (OSError, ValueError):
                pass
        self.dirty = False

    def key(self, sha):
        return f"{sha}:{self.max_pixels}"

    def get(self, sha):
        return self.memo.get(self.key(sha), False)

    def put(self, sha, reason):
        self.memo[self.key(sha)] = reason
        self.dirty = True

    def save(self):
        if self.dirty and self.path:
            atomic_write_text(self.path, json.dumps(self.memo))


def _check_files(candidates, memo, progress):
    """Hash and (once) decode every candidate; returns {relpath: (sha256, reason or None)}."""

    def one(arg):
        rel, path = arg
        try:
            if os.path.getsize(path) == 0:
                return rel, ("", "empty file (0 bytes)")
            sha = file_digest(path)
        except OSError as e:
            return rel, ("", f"unreadable: {e.strerror}")
        reason = memo.get(sha)
        if reason is False:
            reason = images.check_image(path, memo.max_pixels)
            memo.put(sha, reason)
        return rel, (sha, reason)

    results = {}
    bar = None
    if progress and len(candidates) > 200:
        import keras

        bar = keras.utils.Progbar(len(candidates), unit_name="file")
        print("checking images")
    with ThreadPoolExecutor(max_workers=min(8, cores() * 2)) as pool:
        for n, (rel, res) in enumerate(pool.map(one, candidates), 1):
            results[rel] = res
            if bar and (n % 100 == 0 or n == len(candidates)):
                bar.update(n)
    memo.save()
    return results


def scan_tree(root, val_fraction=0.15, test_fraction=0.15, seed=0, per_class=0,
              max_pixels=images.MAX_PIXELS, memo_path=None, progress=True) -> Dataset:
    """Scan a class-folder tree (or train/val/test trees), validate every image, split it."""
    if not os.path.isdir(root):
        raise PipelineError(f"DATA={root}: no such folder; give a class-folder tree "
                            f"(one sub-folder per class) or one of: {', '.join(BUILTIN)}")
    tops = _class_dirs(root)
    split_trees = bool(tops) and all(d.lower() in SPLIT_DIRS for d in tops)
    trees = [(d, SPLIT_DIRS[d.lower()]) for d in tops] if split_trees else [("", None)]
    candidates, ignored, fixed_split = [], 0, {}
    class_sets = {}
    for sub, split in trees:
        top = os.path.join(root, sub)
        classes = _class_dirs(top)
        class_sets[sub] = classes
        for cls in classes:
            for rel, path in _walk_files(os.path.join(top, cls)):
                rel = os.path.join(sub, cls, rel) if sub else os.path.join(cls, rel)
                if any(images.is_hidden(p) for p in rel.split(os.sep)):
                    ignored += 1
                    continue
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
    skipped, kept = [], []
    supported = tuple("." + e for e in images.IMAGE_EXTENSIONS)
    to_check = []
    for rel, path in candidates:
        if not rel.lower().endswith(supported):
            skipped.append((rel, f"not an image file extension ({os.path.splitext(rel)[1] or 'none'})"))
        else:
            to_check.append((rel, path))
    checked = _check_files(to_check, _CheckMemo(memo_path, max_pixels), progress)
    index = {c: i for i, c in enumerate(class_names)}
    for rel, _ in to_check:
        sha, reason = checked[rel]
        if reason:
            skipped.append((rel, reason))
            continue
        parts = rel.split(os.sep)
        cls = parts[1] if split_trees else parts[0]
        split = fixed_split[rel] or split_of(rel, seed, val_fraction, test_fraction)
        kept.append(Item(rel, sha, index[cls], split))
    if not split_trees:
        kept = fill_splits(kept, seed, val_fraction, test_fraction)
    kept = [kept[i] for i in limit_per_class(kept, per_class, seed)]
    name = os.path.basename(os.path.normpath(root))
    ds = Dataset(name, os.path.abspath(root), class_names, kept, sorted(skipped), ignored)
    check_classes(ds, val_fraction, test_fraction, split_trees, root)
    return ds


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
                max_pixels=images.MAX_PIXELS, memo_path=None, progress=True) -> Dataset:
    """``data`` is a folder path or the name of a built-in source."""
    for f, name in ((val_fraction, "VAL_FRACTION"), (test_fraction, "TEST_FRACTION")):
        if not 0 <= f < 1:
            raise PipelineError(f"{name}={f}: must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise PipelineError("VAL_FRACTION + TEST_FRACTION must be below 1 (the rest is training data)")
    if data in BUILTIN:
        return digits(val_fraction, test_fraction, seed, per_class)
    if os.path.sep not in data and not os.path.exists(data):
        raise PipelineError(f"DATA={data}: not a folder nor a built-in source; valid built-ins: "
                            f"{', '.join(BUILTIN)}, or a path to a class-folder tree")
    return scan_tree(data, val_fraction, test_fraction, seed, per_class, max_pixels, memo_path, progress)
