"""Atomic writes: a failed write leaves the previous file intact; outputs get the usual permissions."""

import os

import pytest

from pipeline import records


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.json"
    records.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with records.atomic_path(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert records.read_json(str(path)) == {"v": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_outputs_are_readable_by_others_like_any_written_file(tmp_path):
    records.write_json(tmp_path / "out.json", {"v": 1})
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert os.stat(tmp_path / "out.json").st_mode & 0o777 == os.stat(plain).st_mode & 0o777
