"""Scanning, validation, manifest and split of image sources."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tree, write_image
from PIL import Image

from pipeline.data import sources as data
from pipeline.data import walk
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

    # the scan refuses what its header shows; a file whose header reads but whose data is cut short is found
    # by the one decode that feeds the backbone (tests/cache/test_extract.py), and reported the same way
    skipped = dict(ds.skipped)
    assert set(skipped) == {os.path.join("cat", n) for n in expected if n != "truncated.jpg"}
    for name, why in expected.items():
        if name != "truncated.jpg":
            assert why in skipped[os.path.join("cat", name)].lower()
    kept = {it.relpath for it in ds.items}
    for name in ("cmyk.jpg", "gray.png", "rgba.png", "palette.png", "deep.png", "anim.gif", "truncated.jpg"):
        assert os.path.join("dog" if name != "truncated.jpg" else "cat", name) in kept
    assert ds.ignored == 3
    assert ds.class_names == ["cat", "dog"]
    assert tree_digest(root) == before  # raw data never modified

    from pipeline.cache import extract
    from pipeline.configs import FeaturesConfig

    msgs = []
    extract.run(FeaturesConfig(data=str(root), backbone="mobilenet_v2", alpha=0.35, weights="none", size=32,
                               max_pixels=100_000, val_fraction=0.2, test_fraction=0.2,
                               cache_dir=str(tmp_path / "cache")), log=msgs.append)
    report = next((tmp_path / "cache").glob("*.skipped.tsv")).read_text().splitlines()
    reported = dict(line.split("\t", 1) for line in report[1:])
    assert set(reported) == {os.path.join("cat", n) for n in expected}  # every bad file, as the old full scan
    for name, why in expected.items():
        assert why in reported[os.path.join("cat", name)].lower()


def test_each_image_is_checked_once_across_scans(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "d", per_class=6)
    memo = str(tmp_path / "checked.json")
    calls = []
    real = data.images.check_header
    monkeypatch.setattr(data.images, "check_header", lambda p, m: calls.append(p) or real(p, m))
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


def test_split_without_a_class_is_an_error_whose_advice_works(tmp_path):
    root = make_tree(tmp_path / "d", per_class=1)
    with pytest.raises(PipelineError, match="split has no image of class") as e:
        data.scan_tree(str(root), 0.2, 0.2, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "(3 or more each)" in msg and "make head needs val and test" in msg
    assert len(data.scan_tree(str(root), 0.0, 0.0, progress=False).items) == 2  # features only: works
    make_tree(tmp_path / "d", per_class=3)  # 3 each: every split gets one, whatever the hashes say
    ds = data.scan_tree(str(root), 0.2, 0.2, progress=False)
    assert {(it.label, it.split) for it in ds.items} == {(c, s) for c in (0, 1) for s in data.SPLITS}


def test_split_tree_advice_names_the_folder(tmp_path):
    make_tree(tmp_path / "d" / "train", per_class=3)
    make_tree(tmp_path / "d" / "val", per_class=3)
    make_tree(tmp_path / "d" / "test", classes=("cat",), per_class=3)
    (tmp_path / "d" / "test" / "dog").mkdir()
    with pytest.raises(PipelineError, match="test split has no image of class.*dog; add images of those "
                                            "classes to that split's folder$"):
        data.scan_tree(str(tmp_path / "d"), progress=False)


@pytest.mark.parametrize("where", ["test", "val", "train"])
def test_a_split_lacking_a_class_borrows_from_the_largest_split(where):
    items = [data.Item(f"c/{i}", "", 0, where) for i in range(3)] + [data.Item(f"d/{i}", "", 1, s)
                                                                     for i, s in enumerate(data.SPLITS)]
    filled = data.fill_splits(items, 0, 0.2, 0.2)
    assert sorted(it.split for it in filled if it.label == 0) == sorted(data.SPLITS)
    assert filled[3:] == items[3:]  # a class already in every split is untouched


def rows(ds):
    return {it.relpath: ds.class_names[it.label] for it in ds.items}


def test_links_never_loop_nor_cross_classes_and_each_real_image_is_one_row(tmp_path):
    root = make_tree(tmp_path / "d", per_class=4)
    os.symlink("..", root / "cat" / "up")  # back into the root: every class again
    os.symlink(os.path.join("..", "dog"), root / "cat" / "dogs")  # into another class folder
    (root / "cat" / "sub").mkdir()
    os.symlink(os.path.join("..", "..", "dog", "dog_001.jpg"), root / "cat" / "sub" / "dog.jpg")  # another's file
    os.symlink(root / "cat", root / "cat" / "sub" / "loop")  # a loop inside the class
    os.symlink("cat_000.jpg", root / "cat" / "again.jpg")  # a second path to one file
    ds = data.scan_tree(str(root), 0.0, 0.0, progress=False)
    expected = {os.path.join(c, f"{c}_{i:03d}.jpg"): c for c in ("cat", "dog") for i in range(4)}
    assert rows(ds) == expected
    skipped = dict(ds.skipped)
    assert skipped == {
        os.path.join("cat", "up"): "symlink loop / already scanned: points to the data folder itself",
        os.path.join("cat", "dogs"): "link into another class folder: points to dog",
        os.path.join("cat", "sub", "dog.jpg"): f"link into another class folder: points to "
                                               f"{os.path.join('dog', 'dog_001.jpg')}",
        os.path.join("cat", "sub", "loop"): "symlink loop / already scanned: points to cat",
        os.path.join("cat", "again.jpg"): f"already scanned: same file as {os.path.join('cat', 'cat_000.jpg')}",
    }
def test_symlink_loop_does_not_hang(tmp_path):
    root = make_tree(tmp_path / "d", per_class=4)
    os.symlink(root / "cat", root / "cat" / "loop")
    os.symlink(root, root / "dog" / "up")
    ds = data.scan_tree(str(root), 0.0, 0.0, progress=False)
    assert len(ds.split("train")) == 8
    assert [r for r, why in ds.skipped if why.startswith("symlink loop")] == [os.path.join("cat", "loop"),
                                                                             os.path.join("dog", "up")]


def test_links_outside_the_tree_are_followed_once_and_real_paths_win(tmp_path):
    root = make_tree(tmp_path / "d", per_class=3)
    outside = make_tree(tmp_path / "elsewhere", classes=("more",), per_class=2) / "more"
    os.symlink(outside, root / "cat" / "a_more")  # a folder outside: followed
    os.symlink(outside, root / "cat" / "b_more")  # the same folder again: not walked twice
    os.symlink(outside / "more_000.jpg", root / "dog" / "extra.jpg")  # a file already counted in cat
    os.symlink(os.path.join("sub", "x.jpg"), root / "dog" / "a_link.jpg")  # listed before its real file
    write_image(root / "dog" / "sub" / "x.jpg", seed=5)
    ds = data.scan_tree(str(root), 0.0, 0.0, progress=False)
    got = rows(ds)
    assert got[os.path.join("cat", "a_more", "more_000.jpg")] == "cat" and len(got) == 3 + 3 + 2 + 1
    assert os.path.join("dog", "sub", "x.jpg") in got  # the real path, not the link, is the row
    skipped = dict(ds.skipped)
    assert skipped[os.path.join("cat", "b_more")].startswith("symlink loop / already scanned: points to ")
    assert skipped[os.path.join("dog", "extra.jpg")] == \
        f"already scanned: same file as {os.path.join('cat', 'a_more', 'more_000.jpg')}"
    assert skipped[os.path.join("dog", "a_link.jpg")].startswith("already scanned: same file as ")
    assert [it.relpath for it in ds.items] == sorted((it.relpath for it in ds.items), key=walk._walk_order)


def test_dedupe_off_keeps_every_link_to_one_file(tmp_path):
    root = make_tree(tmp_path / "d", per_class=2)
    for k in range(3):
        os.symlink(root / "cat" / "cat_000.jpg", root / "cat" / f"r{k}.jpg")
    assert len(data.scan_tree(str(root), 0.0, 0.0, progress=False).items) == 4
    assert len(data.scan_tree(str(root), 0.0, 0.0, progress=False, dedupe=False).items) == 7


def test_split_trees_links_across_splits_are_skipped(tmp_path):
    for split in ("train", "val", "test"):
        make_tree(tmp_path / "d" / split, per_class=2)
    d = tmp_path / "d"
    os.symlink(os.path.join("..", "..", "test", "cat"), d / "train" / "cat" / "leak")  # test images into train
    os.symlink(os.path.join("..", "..", "val"), d / "train" / "dog" / "val")  # a whole split tree
    ds = data.scan_tree(str(d), progress=False)
    assert {s: len(ds.split(s)) for s in data.SPLITS} == {"train": 4, "val": 4, "test": 4}
    skipped = dict(ds.skipped)
    assert skipped[os.path.join("train", "cat", "leak")].startswith("link into another class folder")
    assert skipped[os.path.join("train", "dog", "val")].startswith("symlink loop / already scanned")


def test_a_class_folder_that_is_a_link_to_another_is_reported(tmp_path):
    root = make_tree(tmp_path / "d", per_class=3)
    os.symlink("cat", root / "kitty")
    with pytest.raises(PipelineError, match="'kitty' has no usable image"):
        data.scan_tree(str(root), 0.0, 0.0, progress=False)


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


@pytest.mark.parametrize("kw, name", [({"per_class": -1}, "PER_CLASS=-1"), ({"max_pixels": 0}, "MAX_PIXELS=0"),
                                      ({"max_pixels": -1}, "MAX_PIXELS=-1")])
def test_option_ranges_are_checked_before_any_scan(tmp_path, kw, name, monkeypatch):
    monkeypatch.setattr(data, "scan_tree", lambda *a, **k: pytest.fail("scanned"))
    for source in ("digits", str(tmp_path)):
        with pytest.raises(PipelineError, match=f"^{name}: must be "):
            data.open_source(source, **kw)


def test_max_pixels_is_the_limit_at_scan_and_at_load(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "d", per_class=3, size=(40, 32))  # 1280 px
    write_image(root / "cat" / "big.png", size=(50, 40))  # 2000 px
    ds = data.open_source(str(root), 0.0, 0.0, max_pixels=1999, progress=False)
    assert dict(ds.skipped) == {os.path.join("cat", "big.png"): "too large: 50x40 px > limit 1999"}
    assert ds.max_pixels == 1999 and ds.load(0, 16).shape == (16, 16, 3)
    write_image(root / "cat" / "cat_000.jpg", size=(50, 40))  # grown after the scan: the load refuses it
    with pytest.raises(data.images.BadImage, match="too large: 50x40 px > limit 1999"):
        ds.load(0, 16)
    # a limit above Pillow's own (made tiny here) is honoured at the scan and at every load
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    ds = data.open_source(str(root), 0.0, 0.0, max_pixels=2000, progress=False)
    assert ds.skipped == [] and len(ds.items) == 7
    assert all(ds.load(i, 8).shape == (8, 8, 3) for i in range(len(ds.items)))
