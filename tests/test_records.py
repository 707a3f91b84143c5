"""Atomic writes: a failed write leaves the previous file intact; outputs get the usual permissions. The Keras
home: the option reaches Keras before its import, or fails in one line."""

import os
import subprocess
import sys

import pytest
from conftest import MOBILENET_KERAS_FILE, ROOT, make_tree, require_shared

from pipeline import records
from pipeline.errors import PipelineError


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


def test_keras_home_given_after_keras_was_imported_is_a_one_line_error(tmp_path):
    import keras  # noqa: F401

    assert records.keras_home(str(tmp_path)) == str(tmp_path)
    records.use_keras_home(os.environ["KERAS_HOME"])  # the folder Keras already uses: fine
    with pytest.raises(PipelineError, match="Keras was already imported"):
        records.use_keras_home(str(tmp_path / "other"))


@pytest.mark.slow
def test_keras_home_option_is_honoured_by_the_command(tmp_path):
    """KERAS_HOME= reaches Keras before it is imported: ImageNet weights are found in the given folder although
    the environment points at an empty one."""
    require_shared()
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / MOBILENET_KERAS_FILE.name).symlink_to(MOBILENET_KERAS_FILE)
    make_tree(tmp_path / "data", per_class=4)
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "empty")}
    p = subprocess.run([sys.executable, "-m", "pipeline", "features", f"DATA={tmp_path / 'data'}",
                        "BACKBONE=mobilenet", "ALPHA=0.25", "WEIGHTS=imagenet", "SIZE=224", "VAL_FRACTION=0",
                        "TEST_FRACTION=0", f"CACHE_DIR={tmp_path / 'cache'}", f"KERAS_HOME={home}"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert any(tmp_path.joinpath("cache").glob("*.h5"))
