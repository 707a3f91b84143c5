"""``predict`` on its edges: an OUTPUT that cannot be written (checked before any image is labelled), a disk
already full (the output file named, not its temporary one), and a scikit-learn head's quiet start."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, write_image
from mounts import full_disk, read_only
from test_predict import cached_scores, flowers_models

from pipeline import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return flowers_models(tmp_path_factory.mktemp("flowers"), {"logreg": {}})

def test_an_output_that_cannot_be_written_fails_in_one_line_before_any_image_is_labelled(flowers, tmp_path, capsys):
    _, recs, _ = flowers
    image = str(write_image(tmp_path / "a.jpg", seed=1))
    (tmp_path / "plain").write_text("a file")
    with read_only(tmp_path / "ro") as ro:
        for output, said in ((ro / "out.tsv", f"its folder {ro}: cannot write there ("),
                             (tmp_path / "plain" / "out.tsv", f"its folder {tmp_path / 'plain'}: is a file"),
                             (tmp_path, "is a folder; name a file")):
            assert cli.main(["predict", image, f"MODEL={recs['logreg']}", f"OUTPUT={output}"]) == 2
            out, err = capsys.readouterr()
            assert out == "" and err.startswith(f"error: OUTPUT={output}: {said}") and len(err.splitlines()) == 1
        assert os.listdir(ro) == []


def test_a_full_disk_names_the_output_file_not_its_temporary_one(flowers, tmp_path, capsys):
    _, recs, _ = flowers
    image = str(write_image(tmp_path / "a.jpg", seed=1))
    with full_disk(tmp_path / "disk") as disk:
        out = disk / "preds.json"
        assert cli.main(["predict", image, f"MODEL={recs['logreg']}", f"OUTPUT={out}"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == f"error: {out}: No space left on device (OUTPUT={out})"
        assert sorted(os.listdir(disk)) == ["filler"]  # no temporary file left


def test_predict_with_a_scikit_learn_head_keeps_tensorflows_start_up_lines_off_stderr(flowers):
    cache_path, recs, _ = flowers
    files, _, _ = cached_scores(recs["logreg"], cache_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    p = subprocess.run([sys.executable, "-m", "pipeline", "predict", f"MODEL={recs['logreg']}", *files], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()  # one line: what was labelled (and how many look unknown)
    assert len(lines) == 1 and lines[0].startswith(f"labelled {len(files)} image(s) with {recs['logreg']} (logreg "
                                                   "head on mobilenet_v2 features)")
