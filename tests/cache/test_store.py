"""The HDF5 cache file: partial writes, resume, verification, atomic rename, damage detection, listing."""

import hashlib
import os

import h5py
import numpy as np
import pytest
from conftest import flowers_subset

from pipeline import lock
from pipeline.cache import extract, store
from pipeline.configs import FeaturesConfig
from pipeline.cache.writer import Writer
from pipeline.errors import PipelineError

LAYOUT = {"train": ([0, 1, 0, 1, 1], [f"t{i}.jpg" for i in range(5)]), "val": ([1, 0], ["v0.jpg", "v1.jpg"])}
ATTRS = {"config": {"data": "x", "backbone": "b", "size": 32, "pooling": "avg", "weights": "none"},
         "class_names": ["a", "b"], "versions": {"h5py": h5py.__version__}}


def writer(path, key="k1", log=None):
    return Writer(str(path), key, ATTRS, LAYOUT, 4, chunk=2, log=log or (lambda m: None))


def rows(n, start=0):
    return np.arange(start * 4, (start + n) * 4, dtype=np.float32).reshape(n, 4)


def test_complete_file_roundtrip_and_atomic_rename(tmp_path):
    path = tmp_path / "c.h5"
    w = writer(path)
    w.write("train", 0, rows(5))
    assert not path.exists() and (tmp_path / "c.h5.partial").exists()
    w.write("val", 0, rows(2, 5))
    w.finish()
    assert path.exists() and not (tmp_path / "c.h5.partial").exists()
    c = store.load(str(path), expect_key="k1")
    np.testing.assert_array_equal(c.splits["train"].features, rows(5))
    assert list(c.splits["val"].paths) == ["v0.jpg", "v1.jpg"]
    assert c.class_names == ["a", "b"] and c.config["backbone"] == "b" and c.created


def test_partial_file_resumes_with_same_key_and_restarts_with_another(tmp_path):
    path = tmp_path / "c.h5"
    w = writer(path)
    w.write("train", 0, rows(2))
    w.close()  # as if killed after a flushed chunk
    msgs = []
    w = writer(path, log=msgs.append)
    assert w.done("train") == 2 and "resuming" in msgs[0] and "image 2 of 7" in msgs[0]
    w.close()
    w = writer(path, key="k2", log=msgs.append)
    assert w.done("train") == 0 and "another configuration" in msgs[-1]
    w.close()


def test_unreadable_partial_starts_over(tmp_path):
    path = tmp_path / "c.h5"
    (tmp_path / "c.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    msgs = []
    w = writer(path, log=msgs.append)
    assert w.done("train") == 0 and "starting over" in msgs[0]
    w.close()


def test_incomplete_file_refuses_to_finish(tmp_path):
    w = writer(tmp_path / "c.h5")
    w.write("train", 0, rows(5))
    with pytest.raises(PipelineError, match="split val has 0 of 2 rows"):
        w.finish()
    assert not (tmp_path / "c.h5").exists()


def complete(path):
    w = writer(path)
    w.write("train", 0, rows(5))
    w.write("val", 0, rows(2, 5))
    return w.finish()


def test_truncated_file_is_a_clear_error(tmp_path):
    path = complete(tmp_path / "c.h5")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=r"c\.h5.*(not a readable HDF5|corrupt)"):
        store.load(path)


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "c.h5"
    path.write_text("hello")
    with pytest.raises(PipelineError, match=r"c\.h5: not a readable HDF5"):
        store.load(str(path))


def test_wrong_key_and_nan_are_refused(tmp_path):
    path = complete(tmp_path / "c.h5")
    with pytest.raises(PipelineError, match="expected"):
        store.load(path, expect_key="other")
    with h5py.File(path, "r+") as f:
        f["train"]["features"][0, 0] = np.nan
    with pytest.raises(store.Damaged, match="split train has changed since it was written"):  # the checksum first
        store.load(path)
    with h5py.File(path, "r+") as f:  # as if its checksum covered the NaN (a file of an older writer)
        f["train"].attrs["sha256"] = hashlib.sha256(f["train"]["features"][()].tobytes()).hexdigest()
    with pytest.raises(PipelineError, match="NaN/inf features"):
        store.load(path)


def test_listing_shows_complete_partial_and_damaged(tmp_path):
    complete(tmp_path / "a.h5")
    w = writer(tmp_path / "b.h5")
    w.write("train", 0, rows(2))
    w.close()
    (tmp_path / "z.h5").write_text("junk")
    rows_ = {r["file"]: r for r in store.listing(str(tmp_path))}
    assert rows_["a.h5"]["status"] == "complete" and rows_["a.h5"]["counts"] == {"train": "5/5", "val": "2/2"}
    assert rows_["b.h5.partial"]["status"] == "partial" and rows_["b.h5.partial"]["counts"]["train"] == "2/5"
    assert rows_["z.h5"]["status"].startswith("unreadable")


# --- faults: a full disk, a write cut short, changed bytes, a second writer --------------------------------

def test_full_disk_is_one_line_and_a_rerun_resumes_to_the_same_file(tmp_path, monkeypatch):
    import errno

    ref = tmp_path / "ref.h5"
    w = writer(ref)
    w.write("train", 0, rows(4))
    w.write("train", 4, rows(1, 4))
    w.write("val", 0, rows(2, 5))
    w.finish()

    path = tmp_path / "c.h5"
    w = writer(path)
    w.write("train", 0, rows(2))
    real = w.f.flush
    calls = {"n": 0}

    def full(*a):
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w.f, "flush", full)
    with pytest.raises(PipelineError, match=r"^no space left in .*: need about \d+ MiB more .* partial file c\.h5\.partial is kept"):
        w.write("train", 2, rows(2, 2))
    monkeypatch.setattr(w.f, "flush", real)
    w.close()
    w = writer(path)  # space freed: the rerun resumes from what is verified
    assert w.done("train") in (2, 4)
    for start in range(w.done("train"), 4, 2):
        w.write("train", start, rows(2, start))
    w.write("train", 4, rows(1, 4))
    w.write("val", 0, rows(2, 5))
    w.finish()
    a, b = store.load(str(ref)), store.load(str(path))
    for s in a.splits:
        assert a.splits[s].features.tobytes() == b.splits[s].features.tobytes()


def test_a_count_recorded_before_its_rows_is_not_trusted_on_resume(tmp_path):
    """The disk-full failure mode: ``done`` reached the disk, the rows did not (here: zeros)."""
    path = tmp_path / "c.h5"
    w = writer(path)
    w.write("train", 0, rows(2))
    w.write("train", 2, rows(2, 2))
    w.close()
    with h5py.File(str(path) + ".partial", "r+") as f:
        f["train"]["features"][2:4] = 0.0  # the second chunk's rows lost
    msgs = []
    w = writer(path, log=msgs.append)
    assert w.done("train") == 2
    assert any("rows 2-4 of split train fail their checksum" in m for m in msgs)
    w.close()


def test_changed_bytes_in_a_finished_cache_are_refused_naming_the_split(tmp_path):
    path = complete(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f["val"]["features"][1, 2] += 1.0
    with pytest.raises(PipelineError, match=r"split val has changed since it was written"):
        store.load(path)


def test_a_second_writer_waits_or_fails_in_one_line_and_a_locked_partial_is_busy(tmp_path):
    import threading

    path = str(tmp_path / "c.h5")
    w = writer(path)
    w.write("train", 0, rows(2))
    with lock.locked(path, log=lambda m: None):
        with pytest.raises(PipelineError, match=r"another run \(pid \d+\) is writing .*c\.h5; rerun when it is done"):
            with lock.locked(path, wait=False):
                pass
        row = next(r for r in store.listing(str(tmp_path)) if r["file"] == "c.h5.partial")
        assert row["status"].startswith("partial, busy (pid")
        said, got = [], threading.Event()

        def second():
            with lock.locked(path, log=said.append):
                got.set()

        t = threading.Thread(target=second)
        t.start()
        assert not got.wait(0.5)  # held: the second one waits
    t.join(10)
    assert got.is_set() and said and said[0].endswith("; waiting")
    w.close()


def flip(path, split="train", value=np.nan, keep_mtime=True):
    """Overwrite the first feature of ``split`` in the file's bytes on disk (not through HDF5), keeping its size
    and, with ``keep_mtime``, its modification time."""
    st = os.stat(path)
    with h5py.File(path, "r") as f:
        ds = f[split]["features"]
        offset, raw = ds.id.get_chunk_info(0).byte_offset, np.asarray([value], ds.dtype).tobytes()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(raw)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(path) == st.st_size


def test_verify_names_the_rows_whose_bytes_changed(tmp_path):
    path = complete(tmp_path / "c.h5")
    store.verify(path)
    flip(path, "val", 99.0)
    with pytest.raises(store.Damaged, match=r"c\.h5: rows 0-2 of split val have changed since they were written"):
        store.verify(path)
    path = complete(tmp_path / "d.h5")
    with h5py.File(path, "r+") as f:
        f["train"]["chunks"][0] = b"x:y"  # one write of 5 rows: one record
    with pytest.raises(store.Damaged, match="split train: the checksum record of rows from 0 is damaged"):
        store.verify(path)


def test_features_verifies_a_finished_cache_moves_a_damaged_one_aside_and_extracts_again(tmp_path):
    data = flowers_subset(tmp_path / "data", per_class=3)
    cfg = FeaturesConfig(data=str(data), backbone="mobilenet_v2", alpha=0.35, weights="none", size=32,
                         val_fraction=0.34, test_fraction=0.34, cache_dir=str(tmp_path / "cache"))
    said = []
    path = extract.run(cfg, log=said.append)
    first = store.load(path)
    assert not store.verified(path)  # verified by the first run that calls it current
    assert extract.run(cfg, log=said.append) == path and said[-1] == f"up to date: {path}"
    assert store.verified(path)
    flip(path)  # NaN in the first train row; same size and mtime: the inode's ctime tells
    assert not store.verified(path)
    with pytest.raises(store.Damaged, match="split train has changed since it was written .checksum mismatch.; "
                                            "rerun make features"):
        store.load(path)  # not "NaN/inf features ... the backbone or weights"
    said.clear()
    assert extract.run(cfg, log=said.append) == path
    aside = [f for f in os.listdir(tmp_path / "cache") if ".h5.damaged-" in f]
    assert len(aside) == 1 and said[0] == (f"{path}: rows 0-{first.train.features.shape[0]} of split train have "
                                           f"changed since they were written (checksum mismatch): moved aside to "
                                           f"{aside[0]}; extracting again")
    assert any(m.startswith(f"wrote {path}") for m in said)
    again = store.load(path)
    for s in first.splits:
        assert again.splits[s].features.tobytes() == first.splits[s].features.tobytes()
    assert extract.run(cfg, log=said.append) == path and said[-1] == f"up to date: {path}" and store.verified(path)
