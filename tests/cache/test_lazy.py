"""Caches past MEMORY_BUDGET: lazy rows read from the HDF5 file return what an eager load returns, a changed
chunk is still found (chunk by chunk), and a remembered unchanged file is not verified again."""

import h5py
import numpy as np
import pytest

from pipeline.bench import synthetic
from pipeline.cache import lazy, store
from pipeline.cache.writer import Writer
from pipeline.errors import PipelineError


@pytest.fixture
def cache_path(tmp_path):
    return synthetic.write_cache(tmp_path / "c.h5", 2000, dim=24, classes=4, chunk=128)


def test_lazy_rows_equal_eager_rows(cache_path):
    eager = store.load(cache_path)
    assert not lazy.is_lazy(eager)
    c = store.load(cache_path, budget=lazy.footprint(cache_path) - 1)
    assert lazy.is_lazy(c) and c.class_names == eager.class_names and c.key == eager.key
    for s in ("train", "val", "test"):
        a, b = eager.splits[s], c.splits[s]
        assert b.X.shape == a.X.shape and b.X.dtype == np.float16
        np.testing.assert_array_equal(np.asarray(b.X), a.X)
        np.testing.assert_array_equal(b.y, a.y)
        np.testing.assert_array_equal(b.paths, a.paths)
    tr, rows = c.train.X, eager.train.X
    np.testing.assert_array_equal(tr[100:300], rows[100:300])
    picks = np.array([1390, 3, 700, 3, 0])
    np.testing.assert_array_equal(tr[picks], rows[picks])
    np.testing.assert_array_equal(tr[rows[:, 0] > 0], rows[rows[:, 0] > 0])
    np.testing.assert_array_equal(tr[7], rows[7])
    np.testing.assert_array_equal(np.concatenate([b for _, b in lazy.blocks(tr, 300)]), rows)


def test_lazy_rows_leave_out_skipped_images(tmp_path):
    path = str(tmp_path / "s.h5")
    y = np.arange(12, dtype=np.int32) % 2
    lay = {s: (y, [f"c{c}/{s}{i}.jpg" for i, c in enumerate(y)]) for s in ("train", "val", "test")}
    w = Writer(path, "k" * 64, {"config": {}, "class_names": ["a", "b"], "versions": {}}, lay, 3, chunk=4,
               log=lambda m: None)
    X = np.arange(36, dtype=np.float32).reshape(12, 3)
    skipped = np.zeros(12, bool)
    skipped[[2, 9]] = True
    for s in lay:
        for a in range(0, 12, 4):
            w.write(s, a, X[a:a + 4], skipped[a:a + 4])
    w.finish()
    eager, c = store.load(path), store.load(path, budget=0)
    assert len(c.train.X) == 10
    np.testing.assert_array_equal(np.asarray(c.train.X), eager.train.X)
    np.testing.assert_array_equal(c.train.paths, eager.train.paths)


def test_a_changed_chunk_is_found_lazily(cache_path):
    store.load(cache_path, budget=0)
    assert store.verified(cache_path)  # remembered: a warm lazy load does not hash the file again
    with h5py.File(cache_path, "r+") as f:
        f["train"]["features"][300, 5] += 1
    assert not store.verified(cache_path)
    with pytest.raises(store.Damaged, match=r"rows 256-384 of split train have changed"):
        store.load(cache_path, budget=0)


def test_parse_budget():
    assert lazy.parse_budget("2GiB") == 2 << 30
    assert lazy.parse_budget("512m") == 512 << 20
    assert lazy.parse_budget("1000") == 1000
    with pytest.raises(PipelineError, match="MEMORY_BUDGET='lots'"):
        lazy.parse_budget("lots")
