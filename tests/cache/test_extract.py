"""``features`` end to end: the cache key, no-op reruns, reports, and a SIGKILL mid-extraction."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_tree, write_image

from pipeline.cache import extract as features
from pipeline.cache import store
from pipeline.configs import FeaturesConfig

pytestmark = pytest.mark.slow


def cfg(tmp_path, **kw):
    base = dict(data=str(tmp_path / "data"), backbone="mobilenet_v2", weights="none", size=32, alpha=0.35,
                cache_dir=str(tmp_path / "cache"), val_fraction=0.25, test_fraction=0.25, batch=4, chunk=8)
    return FeaturesConfig(**{**base, **kw})


@pytest.fixture
def data(tmp_path):
    return make_tree(tmp_path / "data", per_class=12)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(folder, path) of the baseline cache, made once for the tests that only read it (or add other keys)."""
    root = tmp_path_factory.mktemp("base")
    make_tree(root / "data", per_class=12)
    return root, features.run(cfg(root))


def test_extracts_every_split_with_record(base):
    c = store.load(base[1])
    assert sum(len(s.labels) for s in c.splits.values()) == 24
    assert set(c.splits) == {"train", "val", "test"}
    assert all(s.features.shape[1] == 1280 and s.features.dtype == np.float32 for s in c.splits.values())
    assert c.class_names == ["cat", "dog"]
    ident = c.config["identity"]
    assert ident["backbone"] == "mobilenet_v2" and ident["size"] == 32 and ident["pooling"] == "avg"
    assert ident["weights"]["source"] == "none" and len(ident["weights"]["sha256"]) == 64
    assert {"tensorflow", "keras", "h5py", "numpy"} <= set(c.versions)
    for s in c.splits.values():  # labels follow the class folder of each path
        assert all(c.class_names[y] == p.split(os.sep)[0] for y, p in zip(s.labels, s.paths))


def test_rows_are_the_backbone_on_each_image_in_split_order(tmp_path, data):
    """Decoding ahead in threads changes nothing: each row is the extractor on that image, in order."""
    c = cfg(tmp_path, batch=5, chunk=5)  # batches and chunks that do not divide the splits
    cache = store.load(features.run(c))
    plan = features.Plan(c, log=lambda m: None)
    for s, part in cache.splits.items():
        idx = plan.ds.split(s)
        assert list(part.paths) == [plan.ds.items[i].relpath for i in idx]
        x = np.stack([plan.ds.load(i, plan.size, c.interpolation) for i in idx])
        np.testing.assert_allclose(part.features, plan.model(x, training=False).numpy(), rtol=1e-5, atol=1e-5)


def test_an_image_that_does_not_decode_is_skipped_and_reported_from_the_one_decode(tmp_path, data):
    """The scan checks headers; the pixels are checked by the decode that feeds the backbone: a truncated file
    is skipped and reported as the old full-decode scan did, its row never used, and a rerun is up to date."""
    victim = data / "dog" / "dog_005.jpg"
    victim.write_bytes(victim.read_bytes()[:300])  # a JPEG cut short: its header still reads
    msgs = []
    path = features.run(cfg(tmp_path), log=msgs.append)
    cache = store.load(path)
    assert sum(len(s.labels) for s in cache.splits.values()) == 23
    assert not any(os.path.join("dog", "dog_005.jpg") == p for s in cache.splits.values() for p in s.paths)
    assert any("skipped 1 file(s): 1 truncated JPEG" in m for m in msgs), msgs
    report = next((tmp_path / "cache").glob("*.skipped.tsv")).read_text()
    assert "dog/dog_005.jpg\ttruncated JPEG" in report
    msgs = []
    assert features.run(cfg(tmp_path), log=msgs.append) == path  # the same key: up to date, still reported
    assert any(m.startswith("up to date") for m in msgs) and any("skipped 1 file" in m for m in msgs)


def test_a_first_run_decodes_each_image_once(tmp_path, data, monkeypatch):
    from pipeline.data import images

    calls = []
    real = images._load

    def counting(im):
        calls.append(im)
        return real(im)

    monkeypatch.setattr(images, "_load", counting)
    c = store.load(features.run(cfg(tmp_path)))
    assert len(calls) == sum(len(s.labels) for s in c.splits.values()) == 24  # validation and extraction: one
    calls.clear()
    features.run(cfg(tmp_path))
    assert calls == []  # a rerun decodes nothing


def test_unchanged_rerun_extracts_nothing(base, monkeypatch):
    root, first = base
    mtime = os.path.getmtime(first)
    monkeypatch.setattr(features, "extract", lambda plan: pytest.fail("extracted although up to date"))
    msgs = []
    assert features.run(cfg(root), log=msgs.append) == first
    assert any(m.startswith("up to date") for m in msgs)
    assert os.path.getmtime(first) == mtime


@pytest.mark.parametrize("change", [
    {"backbone": "mobilenet", "alpha": 0.25}, {"size": 40}, {"pooling": "max"}, {"dtype": "float16"},
    {"weights": "none", "seed": 1}, {"interpolation": "nearest"}, {"fold_batchnorm": False},
    {"precision": "bfloat16"},
])
def test_any_change_of_the_key_makes_a_new_cache(base, change):
    root, first = base
    second = features.run(cfg(root, **change))
    assert second != first and os.path.exists(first) and os.path.exists(second)
    assert store.load(second).key != store.load(first).key


def test_changing_one_image_makes_a_new_cache(tmp_path, data):
    first = features.run(cfg(tmp_path))
    write_image(data / "dog" / "dog_003.jpg", (10, 10, 10), seed=5)
    second = features.run(cfg(tmp_path))
    assert second != first
    a, b = store.load(first), store.load(second)
    rel = os.path.join("dog", "dog_003.jpg")
    split = next(s for s in a.splits if rel in list(a.splits[s].paths))
    i = list(a.splits[split].paths).index(rel)
    assert not np.allclose(a.splits[split].features[i], b.splits[split].features[i], rtol=1e-3, atol=0)


def test_float16_storage(base):
    c = store.load(features.run(cfg(base[0], dtype="float16")))
    assert c.splits["train"].features.dtype == np.float16


def test_skipped_files_are_reported_beside_the_cache(tmp_path, data):
    (data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    msgs = []
    path = features.run(cfg(tmp_path), log=msgs.append)
    report = Path(path[: -len(".h5")] + ".skipped.tsv")
    assert "cat/broken.jpg\t" in report.read_text()
    assert any("skipped 1 file(s)" in m and str(report) in m for m in msgs)


def test_skipped_report_keeps_a_row_per_file_with_tabs_and_newlines(tmp_path, data):
    odd = 'bro\tken\n"one".jpg'
    (data / "cat" / odd).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (data / "dog" / "empty.png").write_bytes(b"")
    path = features.run(cfg(tmp_path), log=lambda m: None)
    with open(path[: -len(".h5")] + ".skipped.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["relpath", "reason"] and all(len(r) == 2 for r in rows)
    assert sorted(r[0] for r in rows[1:]) == [f"cat/{odd}", "dog/empty.png"]


def test_digits_source(tmp_path):
    c = store.load(features.run(cfg(tmp_path, data="digits", per_class=6)))
    assert c.class_names == [str(i) for i in range(10)]
    assert sum(len(s.labels) for s in c.splits.values()) >= 55


def run_cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_sigkill_mid_extraction_then_rerun_gives_identical_features(tmp_path):
    make_tree(tmp_path / "data", per_class=150, size=(48, 48))
    args = ["features", f"DATA={tmp_path / 'data'}", "BACKBONE=mobilenet_v2", "WEIGHTS=none", "ALPHA=0.35",
            "SIZE=96", "BATCH=8", "CHUNK=8", "VAL_FRACTION=0.2", "TEST_FRACTION=0.2"]
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    proc = run_cli([*args, f"CACHE_DIR={killed_dir}"])
    deadline = time.time() + 240
    partial = None
    while time.time() < deadline and proc.poll() is None:
        found = list(killed_dir.glob("*.h5.partial")) if killed_dir.exists() else []
        if found and found[0].stat().st_size > 200_000:  # several chunks flushed
            partial = found[0]
            break
        time.sleep(0.05)
    assert partial is not None, "extraction finished or stalled before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(killed_dir.glob("*.h5"))  # nothing was renamed into place

    resumed = run_cli([*args, f"CACHE_DIR={killed_dir}"])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "resuming" in out and "at image 0 of" not in out, out
    clean = run_cli([*args, f"CACHE_DIR={clean_dir}"])
    assert clean.wait(timeout=300) == 0

    a = store.load(str(next(killed_dir.glob("*.h5"))))
    b = store.load(str(next(clean_dir.glob("*.h5"))))
    assert a.key == b.key
    for s in b.splits:
        np.testing.assert_array_equal(a.splits[s].features, b.splits[s].features)
        np.testing.assert_array_equal(a.splits[s].labels, b.splits[s].labels)


def test_cache_command_lists_key_source_backbone_size_counts_and_date(tmp_path, data, capsys):
    from pipeline import cli

    path = features.run(cfg(tmp_path))
    (tmp_path / "cache" / "broken.h5").write_bytes(b"not hdf5")
    capsys.readouterr()
    assert cli.main(["cache", f"CACHE_DIR={tmp_path / 'cache'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "source", "backbone", "weights", "size", "pool", "counts", "date", "status"]
    row = next(line for line in lines if line.startswith(store.load(path).key[:12]))
    cols = row.split()
    assert cols[1:6] == ["data", "mobilenet_v2", "none", "32", "avg"]
    assert "train=13/13" in row and cols[-1] == "complete" and cols[-2].startswith("20")
    assert any(line.startswith("broken.h5") and "unreadable" in line for line in lines)


def test_two_runs_on_the_same_key_at_once_both_succeed_with_one_extraction(tmp_path):
    make_tree(tmp_path / "data", per_class=40, size=(48, 48))
    args = ["features", f"DATA={tmp_path / 'data'}", "BACKBONE=mobilenet_v2", "WEIGHTS=none", "ALPHA=0.35",
            "SIZE=64", "BATCH=8", "CHUNK=8", f"CACHE_DIR={tmp_path / 'cache'}"]
    first, second = run_cli(args), run_cli(args)
    outs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    text = "\n".join(outs)
    assert "killed mid-write" not in text and "starting over" not in text
    # a log, not a terminal: plain progress lines, no carriage returns or escape codes, no CUDA probe noise
    assert "\r" not in text and "\x1b[" not in text and "cuInit" not in text, text
    assert re.search(r"^\d+/\d+ images", text, re.M), text
    assert sum("wrote " in o for o in outs) == 1 and any("up to date" in o for o in outs), outs
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 1


def _mount_tmpfs(where, size):
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return p.returncode == 0


def test_disk_full_during_extraction_is_one_line_and_the_rerun_equals_a_clean_run(tmp_path):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "150k"):
        pytest.skip("mounting a tmpfs needs root (the logic is tested by injection in test_store.py)")
    try:
        make_tree(tmp_path / "data", per_class=30)
        args = ["features", f"DATA={tmp_path / 'data'}", "BACKBONE=mobilenet_v2", "WEIGHTS=none", "ALPHA=0.35",
                "SIZE=32", "BATCH=4", "CHUNK=8"]
        full = run_cli([*args, f"CACHE_DIR={small}"])
        out = full.communicate(timeout=300)[0]
        assert full.returncode == 2, out
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: no space left in {small}: need about"), out
        assert "Traceback" not in out
        subprocess.run(["mount", "-o", "remount,size=20m", str(small)], check=True)
        filler = small / "filler"  # room for the start, then another process fills the disk mid-extraction
        filler.write_bytes(b"\0" * (20 * 2**20 - 2_500_000))
        mid = run_cli([*args, f"CACHE_DIR={small}"])
        deadline = time.time() + 120
        while time.time() < deadline and mid.poll() is None:
            if list(small.glob("*.h5.partial")):
                fd = os.open(small / "more", os.O_WRONLY | os.O_CREAT)  # the disk fills up, to 256 KiB: less than
                try:  # the writer keeps free for HDF5's own metadata (SPACE_MARGIN), more than that metadata needs
                    while os.write(fd, b"\0" * 2**16):
                        pass
                except OSError:
                    os.ftruncate(fd, max(0, os.fstat(fd).st_size - (1 << 18)))
                finally:
                    os.close(fd)
                break
            time.sleep(0.02)
        out = mid.communicate(timeout=300)[0]
        assert mid.returncode in (0, 2) and "Traceback" not in out and "Segmentation" not in out, out
        if mid.returncode == 2:
            assert "no space left in" in out and "is kept: free space and rerun to resume" in out, out
        filler.unlink()
        (small / "more").unlink(missing_ok=True)
        again = run_cli([*args, f"CACHE_DIR={small}"])
        out = again.communicate(timeout=300)[0]
        assert again.returncode == 0, out
        clean = run_cli([*args, f"CACHE_DIR={tmp_path / 'clean'}"])
        assert clean.wait(timeout=300) == 0
        a, b = store.load(str(next(small.glob("*.h5")))), store.load(str(next((tmp_path / "clean").glob("*.h5"))))
        for s in b.splits:
            assert a.splits[s].features.tobytes() == b.splits[s].features.tobytes()
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


@pytest.mark.parametrize("case", ["under_a_file", "is_a_file", "read_only"])
def test_unwritable_cache_dir_is_one_line_before_any_work(tmp_path, data, capsys, case):
    from pipeline import cli

    (tmp_path / "f").write_text("x")
    where = {"under_a_file": tmp_path / "f" / "cache", "is_a_file": tmp_path / "f", "read_only": tmp_path / "ro"}[case]
    if case == "read_only":
        where.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(where)], capture_output=True).returncode:
            os.chmod(where, 0o555)
            if os.access(where, os.W_OK):
                pytest.skip("no read-only folder can be made here (root without mount)")
    try:
        code = cli.main(["features", f"DATA={data}", "BACKBONE=mobilenet_v2", "WEIGHTS=none", "ALPHA=0.35",
                         "SIZE=32", f"CACHE_DIR={where}"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: CACHE_DIR={where}: ") and len(err.strip().splitlines()) == 1
    finally:
        if case == "read_only":
            subprocess.run(["umount", str(where)], capture_output=True)


def test_identical_images_in_two_classes_or_splits_are_reported_not_changed(tmp_path):
    import csv
    import shutil

    root = make_tree(tmp_path / "data", per_class=12)
    shutil.copy(root / "cat" / "cat_000.jpg", root / "dog" / "dog_copy.jpg")  # the same photo in two classes
    msgs = []
    c = store.load(features.run(cfg(tmp_path), log=msgs.append))
    assert any(m.startswith("warning: 1 image(s) with identical content") for m in msgs), msgs
    report = next((tmp_path / "cache").glob("*.duplicates.tsv"))
    rows = list(csv.reader(open(report, newline=""), delimiter="\t"))
    assert rows[0] == ["sha256", "relpath", "class", "split"]
    assert sorted((r[1], r[2]) for r in rows[1:]) == [("cat/cat_000.jpg", "cat"), ("dog/dog_copy.jpg", "dog")]
    assert sum(len(s.labels) for s in c.splits.values()) == 25  # both kept: the user decides
