"""The shared save mechanism: content-named artifacts (files or folders) put in place in one rename, a failed
write leaves nothing, the record switched last and only then what it no longer names removed."""

import json
import os
import re

import pytest

from pipeline import artifacts


def _folder(target, text):
    os.mkdir(target)
    with open(os.path.join(target, "model.xml"), "w") as f:
        f.write(text)


def test_a_folder_is_content_named_and_the_record_switch_removes_the_older_one(tmp_path):
    first, sha, files = artifacts.save(str(tmp_path), "m", "", lambda t: _folder(t, "one"))
    assert os.path.basename(first) == f"m-{sha[:12]}" and set(files) == {"model.xml"}
    artifacts.switch(str(tmp_path / "m.json"), {"file": os.path.basename(first)}, re.compile(r"m-[0-9a-f]{12}"),
                     {os.path.basename(first)})
    again, same, _ = artifacts.save(str(tmp_path), "m", "", lambda t: _folder(t, "one"))
    assert (again, same) == (first, sha)  # the same content: kept in place
    second, sha2, _ = artifacts.save(str(tmp_path), "m", "", lambda t: _folder(t, "two"))
    assert sha2 != sha and sorted(os.listdir(tmp_path)) == sorted(["m.json", os.path.basename(first),
                                                                    os.path.basename(second)])
    (tmp_path / "notes.txt").write_text("kept")
    artifacts.switch(str(tmp_path / "m.json"), {"file": os.path.basename(second)}, re.compile(r"m-[0-9a-f]{12}"),
                     {os.path.basename(second)})
    assert sorted(os.listdir(tmp_path)) == sorted(["m.json", "notes.txt", os.path.basename(second)])
    assert json.loads((tmp_path / "m.json").read_text()) == {"file": os.path.basename(second)}
    assert artifacts.tree_bytes(second) == 3


def test_a_failed_write_leaves_no_file_and_no_staging_folder(tmp_path):
    def half(target):
        with open(target, "w") as f:
            f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        artifacts.save(str(tmp_path), "m", ".onnx", half)
    assert os.listdir(tmp_path) == []
