"""The command line and the Makefile: help, option parsing, one-line errors."""

import errno
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MOBILENET_V2_FILE, ROOT, flowers_subset
from mounts import full_disk

from pipeline import cli
from pipeline.configs import FeaturesConfig, HeadConfig


def test_make_alone_prints_help_for_every_target():
    out = subprocess.run(["make", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for target in ("features", "cache", "test", "run"):
        assert f"make {target}" in out
    targets = subprocess.run(["make", "-qp"], cwd=ROOT, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.strip().startswith("make "):
            name = line.split()[1]
            assert f"\n{name}:" in targets, name


def test_make_passes_variables_through_as_options():
    out = subprocess.run(["make", "-n", "features", "SIZE=96", "BACKBONE=vgg16", "VENV=.venv"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "-m pipeline features 'BACKBONE=vgg16' 'SIZE=96'" in out


AWKWARD = "John's \"photos\" $HOME $(x) `y` a  b"  # quotes, $, make syntax, backquotes, spaces


def make_step(*args):
    """``make -s <args>`` with the test's own interpreter, the install step taken as done."""
    venv = Path(sys.executable).parent.parent
    stamp = subprocess.run("cksum < pyproject.toml", shell=True, cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()[0]
    return subprocess.run(["make", "-s", "-o", f"{venv}/.installed-{stamp}", *args, f"VENV={venv}"], cwd=ROOT,
                          capture_output=True, text=True)


def test_make_passes_values_through_exactly(tmp_path):
    out = subprocess.run(["make", "-n", "features", f"DATA={AWKWARD}", "VENV=.venv"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "-m pipeline features" in x)
    assert shlex.split(line)[-1] == f"DATA={AWKWARD}"
    folder = tmp_path / AWKWARD
    p = make_step("cache", f"CACHE_DIR={folder}")  # the step imports no TensorFlow
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"{folder}: empty; run make features"


def test_both_option_spellings_parse_to_the_config():
    step = cli._steps()["features"]
    cfg, extra = cli.parse("features", step, ["SIZE=96", "--backbone", "vgg16", "--val-fraction=0.3"])
    assert cfg == FeaturesConfig(size=96, backbone="vgg16", val_fraction=0.3) and extra == {}


def test_unknown_option_lists_the_valid_ones(capsys):
    assert cli.main(["features", "COLOUR=red"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: features: unknown option 'COLOUR'; valid: DATA, BACKBONE,")
    assert len(err.strip().splitlines()) == 1


def test_bad_value_type_is_a_one_line_error(capsys):
    assert cli.main(["features", "SIZE=big"]) == 2
    assert "SIZE='big': expected int" in capsys.readouterr().err


def test_unknown_step_and_unknown_backbone(capsys):
    assert cli.main(["featurs"]) == 2
    assert "unknown step 'featurs'; valid: features" in capsys.readouterr().err
    assert cli.main(["features", "BACKBONE=resnet9"]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'resnet9'; valid:" in err and "efficientnet_lite0" in err


def test_step_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "pipeline", "features", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for name in ("--data", "--backbone", "--weights", "--size", "--pooling", "--dtype", "--seed", "--cache-dir"):
        assert name in out


@pytest.mark.parametrize("args", [["DATA=/no/such/folder"], ["POOLING=mean"], ["SIZE=16", "BACKBONE=vgg16"]])
def test_bad_inputs_fail_in_one_line_without_traceback(args):
    p = subprocess.run([sys.executable, "-m", "pipeline", "features", *args], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr + p.stdout


@pytest.mark.parametrize("option", ["PER_CLASS=-1", "MAX_PIXELS=-1", "MAX_PIXELS=0"])
def test_out_of_range_options_fail_in_one_line_naming_the_option(tmp_path, capsys, option):
    assert cli.main(["features", f"DATA={tmp_path}", option, f"CACHE_DIR={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option}: must be ") and len(err.strip().splitlines()) == 1


V2_ALPHAS = "0.35, 0.5, 0.75, 1.0, 1.3, 1.4"


@pytest.mark.parametrize("args, said, scanned", [
    (["BACKBONE=mobilenet_v2", "ALPHA=0.33"], f"ALPHA=0.33: mobilenet_v2 has ImageNet weights for ALPHA={V2_ALPHAS} "
                                              "only; use one of them, or WEIGHTS=none", False),
    (["BACKBONE=mobilenet", "ALPHA=0.33"], "ALPHA=0.33: mobilenet has ImageNet weights for ALPHA=0.25, 0.5, 0.75, "
                                           "1.0 only", False),
    (["BACKBONE=mobilenet_v2", "ALPHA=-1", "WEIGHTS=none"], "ALPHA=-1: the width multiplier must be above 0", False),
    (["BACKBONE=mobilenet_v2", "ALPHA=0.33", f"WEIGHTS={MOBILENET_V2_FILE}"],
     f"WEIGHTS={MOBILENET_V2_FILE} does not fit mobilenet_v2 with SIZE=224, ALPHA=0.33 (Keras: ", True),
    (["BACKBONE=mobilenet_v3_small", "SIZE=96"], "mobilenet_v3_small ImageNet weights are not in the Keras cache", True),
])
@pytest.mark.slow
def test_a_bad_backbone_option_is_one_line_on_stderr_and_writes_no_cache(tmp_path, args, said, scanned):
    """Values the registry knows are bad fail before the scan; those only Keras finds (a weights file of another
    width, ImageNet weights offline) fail in one line without Keras' warnings (conftest's KERAS_HOME holds only
    MobileNet 0.25)."""
    flowers_subset(tmp_path / "data", per_class=6)
    p = subprocess.run([sys.executable, "-m", "pipeline", "features", f"DATA={tmp_path / 'data'}",
                        f"CACHE_DIR={tmp_path / 'cache'}", *args], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith(f"error: {said}"), p.stderr
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert (tmp_path / "cache").exists() == scanned and not list(tmp_path.glob("cache/*.h5*"))


def test_a_disk_full_when_the_run_starts_is_one_line_naming_the_file_and_its_option(tmp_path, capsys):
    data = flowers_subset(tmp_path / "data", per_class=3)
    with full_disk(tmp_path / "disk") as disk:
        cache = disk / "cache"
        assert cli.main(["features", f"DATA={data}", f"CACHE_DIR={cache}", "BACKBONE=mobilenet_v2", "WEIGHTS=none",
                         "ALPHA=0.35", "SIZE=32"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: no space left in {cache}: ") and err.count("\n") == 1, err
        # an OSError with a file: the file and the option whose folder holds it
        cfg = FeaturesConfig(data=str(data), cache_dir=str(cache))
        said = cli.os_error(OSError(errno.ENOSPC, "No space left on device", str(cache / "memo.sqlite")), cfg)
        assert said == f"{cache / 'memo.sqlite'}: No space left on device (CACHE_DIR={cache})"
        # an OSError without a file (a write cut short): the output folders that have no room left
        cfg = HeadConfig(models_dir=str(disk / "models"), reports_dir=str(tmp_path / "reports"))
        (disk / "models").mkdir()
        (tmp_path / "reports").mkdir()
        said = cli.os_error(OSError(errno.ENOSPC, "No space left on device"), cfg)
        assert said == (f"No space left on device: no room left in MODELS_DIR={disk / 'models'}; free space there or "
                        "name another folder")
    assert cli.os_error(OSError(errno.EIO, "Input/output error")) == "Input/output error"
