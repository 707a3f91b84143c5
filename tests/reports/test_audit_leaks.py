"""Duplicates, leaks and outliers on real flowers5 photos: planted copies of train photos in test (the exact
file, a resized one, a re-encoded JPEG) are found and nothing else; a handwritten digit ranks as an outlier."""

import numpy as np
import pytest
from audit_data import planted
from synthetic import blobs, write_arrays

from pipeline.cache import store
from pipeline.cache.store import Split
from pipeline.reports.audit import Skipped, knn, leaks, outliers


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return planted(tmp_path_factory, size=96)


def without(sp, drop):
    keep = ~np.isin(sp.paths, list(drop))
    return Split(sp.features[keep], sp.labels[keep], sp.paths[keep])


def test_planted_copies_are_found_across_splits_and_clean_data_gives_none(flowers):
    path, plants = flowers
    cache = store.load(path)
    th = leaks.threshold(cache.train.features)
    assert 0 < th["distance"] < th["base"] < th["median"]
    pairs = leaks.near(cache.train, {"val": cache.val, "test": cache.test}, th["distance"])
    assert {(p["path"], p["train_path"]) for p in pairs} == set(plants["copies"].items())
    assert all(p["split"] == "test" for p in pairs) and pairs[0]["path"].endswith("copy_exact.jpg")
    clean = {"val": cache.val, "test": without(cache.test, plants["copies"])}
    assert leaks.near(cache.train, clean, th["distance"]) == []


def test_exact_copies_by_content_hash_within_and_across_splits(flowers):
    path, plants = flowers
    cache = store.load(path)
    hashes = leaks.stored_hashes(cache)
    assert {s: len(h) for s, h in hashes.items()} == {s: len(sp.labels) for s, sp in cache.splits.items()}
    files = leaks.file_hashes(cache)  # an older cache without the column: the files hashed again, the same
    assert all(np.array_equal(hashes[s], files[s]) for s in hashes)
    groups = leaks.exact(hashes, {s: sp.paths for s, sp in cache.splits.items()})
    exact = next(p for p in plants["copies"] if p.endswith("copy_exact.jpg"))
    assert groups == [{"sha256": groups[0]["sha256"], "splits": ["train", "test"],
                       "paths": [plants["copies"][exact], exact], "across": True}]
    same = leaks.exact({"train": ["a", "b", "a"], "test": ["c"]}, {"train": ["x", "y", "z"], "test": ["w"]})
    assert same == [{"sha256": "a", "splits": ["train"], "paths": ["x", "z"], "across": False}]


def test_a_digit_among_flowers_is_the_top_outlier(flowers):
    path, plants = flowers
    cache = store.load(path)
    names = ("train", "val", "test")
    X = np.concatenate([cache.splits[s].features for s in names])
    y = np.concatenate([cache.splits[s].labels for s in names])
    paths = np.concatenate([cache.splits[s].paths for s in names])
    splits = np.concatenate([[s] * len(cache.splits[s].labels) for s in names])
    ranked = outliers.rank(X, y, paths, splits, cache.class_names, k=10)
    assert [r["path"] for r in ranked[:3]].count(plants["digit"]) == 1
    assert ranked[0]["score"] >= ranked[-1]["score"] and len(ranked) == len(y)


def test_neighbours_block_by_block_equal_one_product():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(37, 5)), rng.normal(size=(23, 5))
    full = knn.unit(a) @ knn.unit(b).T
    sims, idx = knn.nearest(a, b, 3, block=8)
    assert np.array_equal(idx, np.argsort(-full, axis=1)[:, :3])
    assert np.allclose(sims, np.sort(full, axis=1)[:, ::-1][:, :3], atol=1e-6)
    sims, idx = knn.nearest(a, a, 2, same=True, block=5)
    assert not (idx == np.arange(len(a))[:, None]).any()


def test_too_few_train_images_or_no_hashes_are_skipped_with_their_reason(tmp_path):
    with pytest.raises(Skipped, match="fewer than two images"):
        leaks.threshold(np.ones((1, 4)))
    cache = store.load(write_arrays(tmp_path / "s.h5", ("a", "b"), blobs(("a", "b"), dim=4)))
    assert leaks.stored_hashes(cache) is None  # written without the column
    with pytest.raises(Skipped, match="no content hashes and no source folder"):
        leaks.file_hashes(cache)
