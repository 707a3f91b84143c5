"""The one engine with its options composed, each case against a clean in-process run of the same
configuration: rows lent by an earlier cache with VIEWS and with TTA (view rows only by a cache of the same
augmentation, view j only as view j), and RUNTIME=openvino with VIEWS, TTA and reuse. Ray's cases are in
test_ray.py (one Ray cluster for them all)."""

import os
import re

import h5py
import numpy as np
import pytest
from conftest import make_tree, write_image

from pipeline.cache import engine, groups, store
from pipeline.cache import extract as features
from pipeline.cache.plan import Plan
from pipeline.configs import FeaturesConfig

pytestmark = pytest.mark.slow


def cfg(root, cache="cache", **kw):
    base = dict(data=str(root / "data"), backbone="mobilenet_v2", weights="none", size=32, alpha=0.35,
                cache_dir=str(root / cache), val_fraction=0.25, test_fraction=0.25, batch=4, chunk=8)
    return FeaturesConfig(**{**base, **kw})


def assert_same(a_path, b_path, exact=True):
    """The same cache: key, every group's labels, skipped marks, paths and content hashes bit for bit; features
    bit for bit, or with ``exact=False`` to float rounding."""
    assert store.load(a_path).key == store.load(b_path).key
    with h5py.File(a_path) as fa, h5py.File(b_path) as fb:
        assert set(fa) == set(fb)
        for g in fb:
            for name in ("labels", "skipped", groups.HASHES) + (("features",) if exact else ()):
                assert fa[g][name][()].tobytes() == fb[g][name][()].tobytes(), (g, name)
            np.testing.assert_allclose(fa[g]["features"][()], fb[g]["features"][()], rtol=1e-5, atol=1e-6)
            assert fa[g]["paths"].asstr()[()].tolist() == fb[g]["paths"].asstr()[()].tolist()


def rows_of(path) -> dict:
    with h5py.File(path) as f:
        return {g: len(f[g]["features"]) for g in f}


def add_images(root, n=3):
    for k in range(n):
        write_image(root / "data" / ("cat", "dog")[k % 2] / f"new_{k}.jpg", (90, 90, 160), seed=700 + k)


def reused(msgs, lender):
    """(rows lent, rows extracted) of the run's "reused" line, naming ``lender``."""
    m = [re.match(rf"reused (\d+) rows from {re.escape(os.path.basename(lender))}, extracting (\d+)$", s)
         for s in msgs]
    hits = [(int(x[1]), int(x[2])) for x in m if x]
    assert len(hits) == 1, msgs
    return hits[0]


@pytest.mark.parametrize("more", [{"views": 2}, {"tta": True}], ids=["views", "tta"])
def test_an_earlier_cache_lends_its_view_and_tta_rows(tmp_path, more):
    make_tree(tmp_path / "data", per_class=12)
    first = features.run(cfg(tmp_path, **more), log=lambda m: None)
    add_images(tmp_path)
    msgs = []
    path = features.run(cfg(tmp_path, **more), log=msgs.append)
    total = sum(rows_of(path).values())
    assert reused(msgs, first) == (sum(rows_of(first).values()), total - sum(rows_of(first).values()))
    # lent rows sit elsewhere in their batches than from scratch: equal to float rounding where the CPU's
    # kernels make a row's last bits depend on its place (AVX2-only CPUs), bit for bit elsewhere
    assert_same(path, features.run(cfg(tmp_path, "scratch", **more), log=lambda m: None), exact=False)


def test_view_rows_are_lent_only_by_a_cache_of_the_same_augmentation(tmp_path):
    make_tree(tmp_path / "data", per_class=12)
    other = features.run(cfg(tmp_path, views=2, rotation=0.2), log=lambda m: None)
    n = rows_of(other)
    msgs = []
    three = features.run(cfg(tmp_path, views=3), log=msgs.append)  # another rotation: its clean rows only
    clean = n["train"] + n["val"] + n["test"]
    assert reused(msgs, other) == (clean, 3 * n["train"])
    msgs = []
    four = features.run(cfg(tmp_path, views=4), log=msgs.append)  # views 0-2 lent, view 3 made
    assert reused(msgs, three) == (clean + 3 * n["train"], n["train"])
    assert_same(three, features.run(cfg(tmp_path, "scratch", views=3), log=lambda m: None), exact=False)
    assert_same(four, features.run(cfg(tmp_path, "scratch", views=4), log=lambda m: None), exact=False)


def serial(c) -> dict:
    """{group: rows} of a plain serial loop over the extraction's compiled call, BATCH images at a time: each
    group's clean pixels, mirrored for TTA, view j of each train image for VIEWS."""
    from pipeline.data.augment import Views

    plan = Plan(c, log=lambda m: None)
    call, ds = engine.prepare(plan), plan.ds
    aug = Views(c.flip, c.rotation, c.zoom, c.contrast, c.seed)
    out = {}
    for s in ds.splits():
        idx = ds.split(s, all_rows=True)
        x = np.stack([ds.load(i, plan.size, c.interpolation) for i in idx])
        made = {s: x}
        if c.tta and s in store.TTA:
            made[store.TTA[s]] = x[:, :, ::-1]
        if c.views and s == "train":
            keys = [(ds.items[i].sha256, j) for i in idx for j in range(c.views)]
            made[store.VIEWS] = aug.batch(np.repeat(x, c.views, axis=0), keys)
        for g, px in made.items():
            out[g] = np.concatenate([call(np.ascontiguousarray(px[k:k + c.batch])).numpy()
                                     for k in range(0, len(px), c.batch)])
    return out


def test_the_default_cache_is_a_serial_loop_bit_for_bit(tmp_path):
    """Without views, TTA or a lender: exactly the rows (and so the bytes) of a serial loop over the compiled
    call, as before the engine existed; the key has only the fields it always had."""
    make_tree(tmp_path / "data", per_class=12)
    path = features.run(cfg(tmp_path, batch=5, chunk=5), log=lambda m: None)  # batches that do not divide splits
    want = serial(cfg(tmp_path, batch=5, chunk=5))
    with h5py.File(path) as f:
        assert set(f) == set(want) == {"train", "val", "test"}
        for g in f:
            assert f[g]["features"][()].tobytes() == want[g].astype(np.float32).tobytes(), g
    assert set(store.load(path).config["identity"]) == {
        "manifest", "backbone", "weights", "size", "alpha", "interpolation", "preprocessing", "pooling", "dtype",
        "precision", "fold_batchnorm", "extract_version"}


def test_openvino_makes_view_and_tta_rows_and_lends_them(tmp_path):
    make_tree(tmp_path / "data", per_class=12)
    ov = dict(runtime="openvino", views=2, tta=True)
    first = features.run(cfg(tmp_path, **ov), log=lambda m: None)
    want = serial(cfg(tmp_path, **ov))
    with h5py.File(first) as f:
        assert set(f) == set(want) == {"train", "val", "test", store.VIEWS, "val_tta", "test_tta"}
        for g in f:  # the same compiled call on the same batches: the same bytes
            assert f[g]["features"][()].tobytes() == want[g].astype(np.float32).tobytes(), g
    add_images(tmp_path)
    msgs = []
    path = features.run(cfg(tmp_path, **ov), log=msgs.append)
    assert reused(msgs, first)[0] == sum(rows_of(first).values())
    assert_same(path, features.run(cfg(tmp_path, "scratch", **ov), log=lambda m: None), exact=False)  # as above
