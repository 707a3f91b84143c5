"""``predict``'s walk of the files and folders it is given: links followed, never in a loop, each real file once."""

import os

from conftest import make_tree, write_image

from pipeline.serve.predict import image_paths


def test_a_folder_with_a_loop_lists_each_real_file_once(tmp_path):
    root = make_tree(tmp_path / "photos", per_class=2)
    os.symlink("..", root / "cat" / "up")  # back to photos/
    os.symlink(root, root / "dog" / "again")  # photos/ again
    os.symlink(tmp_path, root / "dog" / "top")  # above photos/: would list what was not asked for
    write_image(tmp_path / "elsewhere.jpg")
    os.symlink(root / "cat" / "cat_000.jpg", root / "dog" / "copy.jpg")  # a second path to one file
    files, problems, ignored = image_paths([str(root), str(root / "cat"), str(root / "cat" / "cat_001.jpg")])
    assert files == [str(root / c / f"{c}_{i:03d}.jpg") for c in ("cat", "dog") for i in range(2)]
    assert problems == [] and ignored == 0


def test_links_outside_are_followed_and_named_files_tried_once(tmp_path):
    photos = make_tree(tmp_path / "photos", classes=("a",), per_class=1) / "a"
    more = make_tree(tmp_path / "more", classes=("b",), per_class=1) / "b"
    os.symlink(more, photos / "more")
    named = str(more / "b_000.jpg")
    files, problems, _ = image_paths([named, str(photos), named, str(tmp_path / "nope.jpg")])
    assert files == [named, str(photos / "a_000.jpg")]
    assert problems == [(str(tmp_path / "nope.jpg"), "no such file or folder")]
