"""Scanning, validation, manifest and split of image sources."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tree, write_image
from PIL import Image

from pipeline.data import sources as data
from pipeline.errors import PipelineError


def tree_digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                h.update(p.encode() + open(p, "rb").read())
    return h.hexdigest()


def add_bad_files(cls_dir):
    """One of each kind of bad file a real folder holds; returns {name: expected-reason substring}."""
    cls_dir = Path(cls_dir)
    good = write_image(cls_dir / "good_src.jpg", seed=7, size=(64, 48))
    raw = good.read_bytes()
    (cls_dir / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (cls_dir / "empty.jpg").write_bytes(b"")
    (cls_dir / "notes.jpg").write_text("this is not an image\n")
    (cls_dir / "readme.txt").write_text("not an image either\n")
    write_image(cls_dir / "huge.png", size=(400, 300))
    return {"truncated.jpg": "truncat", "empty.jpg": "empty", "notes.jpg": "", "readme.txt": "extension",
            "huge.png": "large"}


def test_bad_files_are_skipped_and_reported_good_ones_kept(tmp_path):
    root = make_tree(tmp_path / "d", per_class=10)
    expected = add_bad_files(root / "cat")
    # images that must decode correctly to RGB
    write_image(root / "dog" / "cmyk.jpg", mode="CMYK")
    write_image(root / "dog" / "gray.png", mode="L")
    write_image(root / "dog" / "rgba.png", mode="RGBA")
    write_image(root / "dog" / "palette.png", mode="P")
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(root / "dog" / "deep.png")
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(root / "dog" / "anim.gif", save_all=True, append_images=frames[1:])
    (root / "dog" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "dog" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "dog" / "._cmyk.jpg").write_bytes(b"\0\5\x16\7")
    before = tree_digest(root)

    ds = data.scan_tree(str(root), val_fraction=0.2, test_fraction=0.2, max_pixels=100_000, progress=False)

    skipped = dict(ds.skipped)
    assert set(skipped) == {os.path.join("cat", n) for n in expected}
    for name, why in expected.items():
        assert why in skipped[os.path.join("cat", name)].lower()
    kept = {it.relpath for it in ds.items}
    for name in ("cmyk.jpg", "gray.png", "rgba.png", "palette.png", "deep.png", "anim.gif"):
        assert os.path.join("dog", name) in kept
    assert ds.ignored == 3
    assert ds.class_names == ["cat", "dog"]
    assert tree_digest(root) == before  # raw data never modified


def test_each_image_is_decoded_once_across_scans(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "d", per_class=6)
    memo = str(tmp_path / "checked.json")
    calls = []
    real = data.images.check_image
    monkeypatch.setattr(data.images, "check_image", lambda p, m: calls.append(p) or real(p, m))
    data.scan_tree(str(root), 0.2, 0.2, max_pixels=10**7, memo_path=memo, progress=False)
    assert len(calls) == 12
    data.scan_tree(str(root), 0.2, 0.2, max_pixels=10**7, memo_path=memo, progress=False)
    assert len(calls) == 12


def test_split_is_stable_when_files_are_added(tmp_path):
    root = make_tree(tmp_path / "d", per_class=30)
    first = {it.relpath: it.split for it in data.scan_tree(str(root), 0.2, 0.2, progress=False).items}
    make_tree(tmp_path / "more", per_class=45)
    for cls in ("cat", "dog"):
        for f in sorted(os.listdir(tmp_path / "more" / cls))[30:]:
            os.rename(tmp_path / "more" / cls / f, root / cls / f)
    second = {it.relpath: it.split for it in data.scan_tree(str(root), 0.2, 0.2, progress=False).items}
    assert len(second) == 90
    assert all(second[r] == s for r, s in first.items())
    assert {"train", "val", "test"} == set(second.values())


def test_split_follows_seed_and_fractions(tmp_path):
    root = make_tree(tmp_path / "d", per_class=100, size=(8, 8))
    ds = data.scan_tree(str(root), 0.25, 0.25, seed=1, progress=False)
    counts = {s: len(ds.split(s)) for s in data.SPLITS}
    assert 60 <= counts["train"] <= 140 and 25 <= counts["val"] <= 75 and 25 <= counts["test"] <= 75
    other = data.scan_tree(str(root), 0.25, 0.25, seed=2, progress=False)
    assert [it.split for it in other.items] != [it.split for it in ds.items]


def test_separate_split_trees(tmp_path):
    for split in ("train", "val", "test"):
        make_tree(tmp_path / "d" / split, per_class=3)
    ds = data.scan_tree(str(tmp_path / "d"), progress=False)
    assert ds.class_names == ["cat", "dog"]
    assert {s: len(ds.split(s)) for s in data.SPLITS} == {"train": 6, "val": 6, "test": 6}
    assert all(it.relpath.split(os.sep)[0] == it.split for it in ds.items)


def test_split_tree_missing_a_class_is_an_error(tmp_path):
    make_tree(tmp_path / "d" / "train", per_class=3)
    make_tree(tmp_path / "d" / "val", classes=("cat",), per_class=3)
    with pytest.raises(PipelineError, match="'val' has no folder for class.*dog"):
        data.scan_tree(str(tmp_path / "d"), progress=False)


def test_empty_class_folder_is_an_error(tmp_path):
    root = make_tree(tmp_path / "d", per_class=5)
    (root / "bird").mkdir()
    with pytest.raises(PipelineError, match="'bird' has no usable image"):
        data.scan_tree(str(root), progress=False)


def test_single_class_is_an_error(tmp_path):
    root = make_tree(tmp_path / "d", classes=("cat",), per_class=5)
    with pytest.raises(PipelineError, match="at least 2"):
        data.scan_tree(str(root), progress=False)


def test_split_without_a_class_is_an_error(tmp_path):
    root = make_tree(tmp_path / "d", per_class=1)
    with pytest.raises(PipelineError, match="split has no image of class"):
        data.scan_tree(str(root), 0.2, 0.2, progress=False)


def test_symlink_loop_does_not_hang(tmp_path):
    root = make_tree(tmp_path / "d", per_class=4)
    os.symlink(root / "cat", root / "cat" / "loop")
    os.symlink(root, root / "dog" / "up")
    ds = data.scan_tree(str(root), 0.0, 0.0, progress=False)
    assert len(ds.split("train")) >= 8


def test_per_class_keeps_split_proportions(tmp_path):
    root = make_tree(tmp_path / "d", per_class=40, size=(8, 8))
    ds = data.scan_tree(str(root), 0.2, 0.2, per_class=10, progress=False)
    for label in (0, 1):
        mine = [it for it in ds.items if it.label == label]
        assert 9 <= len(mine) <= 11
        assert {it.split for it in mine} == {"train", "val", "test"}


def test_manifest_digest_changes_with_content(tmp_path):
    root = make_tree(tmp_path / "d", per_class=5)
    a = data.scan_tree(str(root), 0.0, 0.0, progress=False).manifest_digest()
    write_image(root / "cat" / "cat_000.jpg", seed=99)
    b = data.scan_tree(str(root), 0.0, 0.0, progress=False).manifest_digest()
    assert a != b


def test_digits_builtin():
    ds = data.open_source("digits", per_class=20)
    assert ds.class_names == [str(i) for i in range(10)]
    img = ds.load(0, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.max() > 200
    assert set(ds.splits()) == {"train", "val", "test"}


def test_unknown_source_lists_builtins():
    with pytest.raises(PipelineError, match="digits"):
        data.open_source("mnist")
