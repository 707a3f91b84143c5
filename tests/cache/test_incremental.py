"""Incremental extraction: an earlier cache of the same backbone configuration lends the rows of the images it
holds; only new or changed images go through the backbone, and the cache equals a from-scratch one, bit for bit."""

import os
import shutil

import numpy as np
import pytest
from conftest import make_tree, write_image

from pipeline.cache import extract as features
from pipeline.cache import engine, groups, store
from pipeline.configs import FeaturesConfig

pytestmark = pytest.mark.slow


def cfg(root, cache="cache", **kw):
    base = dict(data=str(root / "data"), backbone="mobilenet_v2", weights="none", size=32, alpha=0.35,
                cache_dir=str(root / cache), val_fraction=0.25, test_fraction=0.25, batch=4, chunk=8)
    return FeaturesConfig(**{**base, **kw})


def assert_same(a_path, b_path):
    """Two cache files with the same key and the same rows, byte for byte (skipped marks and hashes too)."""
    import h5py

    a, b = store.load(a_path), store.load(b_path)
    assert a.key == b.key and a.class_names == b.class_names
    assert set(a.splits) == set(b.splits)
    with h5py.File(a_path) as fa, h5py.File(b_path) as fb:
        for s in fb:
            for name in ("features", "labels", "skipped", groups.HASHES):
                assert fa[s][name][()].tobytes() == fb[s][name][()].tobytes(), (s, name)
            assert fa[s]["paths"].asstr()[()].tolist() == fb[s]["paths"].asstr()[()].tolist()


@pytest.fixture
def decodes(monkeypatch):
    """Every image decode, counted (validation at the scan only reads headers: these are the backbone's)."""
    from pipeline.data import images

    calls, real = [], images._load

    def counting(im):
        calls.append(im)
        return real(im)

    monkeypatch.setattr(images, "_load", counting)
    return calls


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])
def test_a_row_does_not_depend_on_its_batch_neighbours_nor_its_place(backbone):
    """The compiled call on the same images among other neighbours: the same bytes; in other places, beside
    blank padding: the same to float rounding (bytes on some CPUs). (The batch size can matter, a batch of one especially: reuse keeps it, see below.)"""
    from pipeline import quiet

    quiet.tensorflow()
    from pipeline.backbones import extractor, registry

    spec = registry.get(backbone)
    model, _ = extractor.build(spec, 32, "none", "avg", alpha=0.35 if backbone == "mobilenet_v2" else None)
    call = extractor.compiled_call(model, 32, fold=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    ref = call(x[:8]).numpy()
    other = x[:8].copy()
    other[4:] = x[8:12]  # rows 0-3 with other neighbours
    assert call(other).numpy()[:4].tobytes() == ref[:4].tobytes()
    # a row's place in the batch: the same bytes on AVX-512 CPUs, the same to float rounding on AVX2 ones (oneDNN's
    # kernels block the batch differently there; seen on an AVX2-only AMD EPYC)
    perm = rng.permutation(8)
    np.testing.assert_allclose(call(x[:8][perm]).numpy(), ref[perm], rtol=1e-5, atol=1e-6)
    padded = np.zeros_like(x[:8])
    padded[:3] = x[5:8]
    np.testing.assert_allclose(call(padded).numpy()[:3], ref[5:8], rtol=1e-5, atol=1e-6)


def test_three_added_images_are_the_only_rows_extracted(tmp_path, decodes):
    root = tmp_path
    make_tree(root / "data", per_class=12)
    first = features.run(cfg(root), log=lambda m: None)
    for k in range(3):
        write_image(root / "data" / ("cat", "dog")[k % 2] / f"new_{k}.jpg", (90, 90, 160), seed=700 + k)
    decodes.clear()
    msgs = []
    plan = features.Plan(cfg(root), log=msgs.append)
    second = features.ensure(plan)
    assert second != first and os.path.exists(first)
    assert len(decodes) == 3 and plan.stats["images"] == 3
    assert f"reused 24 rows from {os.path.basename(first)}, extracting 3" in msgs, msgs
    assert_same(second, features.run(cfg(root, "scratch"), log=lambda m: None))


def test_an_image_that_did_not_decode_is_not_lent(tmp_path, decodes):
    """Its row is marked skipped in the lender: the new cache runs it again (known bad by its content: blank
    pixels, not decoded), marks it skipped, and reports it."""
    root = tmp_path
    make_tree(root / "data", per_class=12)
    victim = root / "data" / "dog" / "dog_005.jpg"
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])  # its header reads, its pixels do not
    features.run(cfg(root), log=lambda m: None)
    write_image(root / "data" / "cat" / "new.jpg", (90, 90, 160), seed=7)
    decodes.clear()
    msgs = []
    second = features.run(cfg(root), log=msgs.append)
    assert len(decodes) == 1 and any(m.endswith("extracting 2") for m in msgs), msgs
    assert any("skipped 1 file(s): 1 truncated JPEG" in m for m in msgs), msgs
    assert_same(second, features.run(cfg(root, "scratch"), log=lambda m: None))
    assert sum(len(s.labels) for s in store.load(second).splits.values()) == 24  # 25 rows, one skipped


def test_a_changed_image_is_the_one_row_extracted_again(tmp_path, decodes):
    root = tmp_path
    make_tree(root / "data", per_class=12)
    first = features.run(cfg(root), log=lambda m: None)
    write_image(root / "data" / "dog" / "dog_003.jpg", (10, 10, 10), seed=5)
    decodes.clear()
    msgs = []
    second = features.run(cfg(root), log=msgs.append)
    assert len(decodes) == 1 and any(m.startswith("reused 23 rows from ") and m.endswith("extracting 1") for m in msgs)
    assert_same(second, features.run(cfg(root, "scratch"), log=lambda m: None))
    a, b = store.load(first), store.load(second)
    rel = os.path.join("dog", "dog_003.jpg")
    s = next(s for s in a.splits if rel in list(a.splits[s].paths))
    i = list(a.splits[s].paths).index(rel)
    assert a.splits[s].features[i].tobytes() != b.splits[s].features[i].tobytes()


def test_every_call_runs_on_a_full_batch_so_a_row_keeps_its_bytes_wherever_it_lands(tmp_path):
    """efficientnet_lite0 can give other last bits in a batch of one: a split's last batch is padded to BATCH
    with blank images, so an image keeps its bytes when added images move it into or out of a last batch."""
    root = tmp_path
    make_tree(root / "data", per_class=10)
    c = dict(backbone="efficientnet_lite0", alpha=0.0, batch=4, chunk=4)
    features.run(cfg(root, **c), log=lambda m: None)
    for k in range(3):
        write_image(root / "data" / ("cat", "dog")[k % 2] / f"zzz_{k}.jpg", (90, 90, 160), seed=99 + k)
    msgs = []
    inc = features.run(cfg(root, **c), log=msgs.append)
    assert any(m.endswith("extracting 3") for m in msgs), msgs
    assert_same(inc, features.run(cfg(root, "scratch", **c), log=lambda m: None))
    plan = features.Plan(cfg(root, "scratch", **c), log=lambda m: None)
    call = engine.prepare(plan)
    x = np.stack([plan.ds.load(i, plan.size) for i in range(4)])
    assert call(x[:1]).numpy()[0].tobytes() == call(x).numpy()[0].tobytes()


def test_only_a_cache_of_the_same_backbone_configuration_lends(tmp_path):
    root = tmp_path
    make_tree(root / "data", per_class=12)
    features.run(cfg(root, dtype="float16"), log=lambda m: None)  # another stored dtype: its rows differ
    features.run(cfg(root, batch=8), log=lambda m: None)  # another BATCH: its rows may differ in the last bits
    write_image(root / "data" / "cat" / "new.jpg", (90, 90, 160), seed=7)
    msgs = []
    path = features.run(cfg(root), log=msgs.append)
    assert not any(m.startswith("reused") for m in msgs)
    assert_same(path, features.run(cfg(root, "scratch"), log=lambda m: None))


def test_a_changed_lender_is_not_used(tmp_path):
    import h5py

    root = tmp_path
    make_tree(root / "data", per_class=12)
    first = features.run(cfg(root), log=lambda m: None)
    with h5py.File(first, "r+") as f:
        f["train"]["features"][0, 0] += 1.0  # a changed byte: its checksum no longer matches
    write_image(root / "data" / "cat" / "new.jpg", (90, 90, 160), seed=7)
    msgs = []
    path = features.run(cfg(root), log=msgs.append)
    assert any("has changed since it was written" in m and "not reused" in m for m in msgs), msgs
    assert not any(m.startswith("reused") for m in msgs)
    shutil.rmtree(root / "scratch", ignore_errors=True)
    assert_same(path, features.run(cfg(root, "scratch"), log=lambda m: None))
