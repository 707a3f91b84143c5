"""Augmented views cached once: K views of every train image beside its clean row, deterministic per (image
content, view, SEED), resumable, in the key; heads train on them, evaluation stays on clean rows."""

import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, flowers_subset

import pipeline
from pipeline.cache import store
from pipeline.heads.sweep import grouped_folds

pytestmark = pytest.mark.slow


def opts(root, **kw):
    return {"data": str(root / "data"), "backbone": "mobilenet_v2", "alpha": 0.35, "weights": str(MOBILENET_V2_FILE),
            "size": 64, "views": 3, "batch": 4, "chunk": 8, "val_fraction": 0.25, "test_fraction": 0.25, **kw}


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    flowers_subset(root / "data", per_class=6)
    return root


def test_views_are_deterministic_distinct_and_only_of_train(flowers):
    a = pipeline.load_cache(pipeline.features(**opts(flowers), cache_dir=str(flowers / "a")))
    b = pipeline.load_cache(pipeline.features(**{**opts(flowers), "batch": 8}, cache_dir=str(flowers / "b")))
    v, n = a.views, len(a.train.labels)
    assert v.X.shape == (3 * n, a.train.X.shape[1]) and list(v.view[:6]) == [0, 1, 2, 0, 1, 2]
    assert np.array_equal(v.image, np.repeat(np.arange(n), 3)) and np.array_equal(v.y, np.repeat(a.train.y, 3))
    # the same options, another batch size: the same views (their pixels are bit-identical, see below; the
    # backbone's last bits may depend on the batch size, which is why only a cache of the same BATCH lends rows)
    np.testing.assert_allclose(v.X, b.views.X, rtol=1e-4, atol=1e-5)
    clean = a.train.X[v.image]
    assert not np.isclose(v.X, clean, atol=1e-3).all(axis=1).any()  # every view differs from its clean row
    assert not np.isclose(v.X[0::3], v.X[1::3], atol=1e-3).all(axis=1).any()  # and from the other views
    with store.h5py.File(a.path) as f:
        assert set(f) == {"train", "val", "test", store.VIEWS}  # val and test have none
    assert len(v.upto(1).labels) == n  # a cache with more views serves fewer


def test_a_views_pixels_are_the_same_whatever_its_batch():
    from pipeline.data.augment import Views

    x = np.random.default_rng(0).integers(0, 256, (8, 48, 48, 3), dtype=np.uint8)
    keys = [(f"{i:064x}", i % 3) for i in range(8)]
    aug = Views(rotation=0.2, zoom=0.2, contrast=0.2)
    whole = aug.batch(x, keys)
    assert np.array_equal(whole, np.concatenate([aug.batch(x[:3], keys[:3]), aug.batch(x[3:], keys[3:])]))
    assert np.array_equal(whole[5], aug.view(x[5], *keys[5]))
    assert not np.array_equal(whole[0], x[0])


@pytest.mark.parametrize("change", [{"views": 2}, {"flip": "none"}, {"rotation": 0.2}, {"zoom": 0.0},
                                    {"contrast": 0.3}, {"seed": 1}])
def test_the_key_has_the_count_and_every_augmentation_option(flowers, change):
    from pipeline.cache.plan import Plan
    from pipeline.configs import FeaturesConfig

    def key(**kw):
        return Plan(FeaturesConfig(**{**opts(flowers), **kw}, cache_dir=str(flowers / "k")), log=lambda m: None,
                    lazy=True).key

    assert key(**change) != key()
    assert key(views=0) == key(views=0, flip="none")  # without views the augmentation is not in the key


def test_a_killed_view_extraction_resumes_to_the_same_rows(tmp_path):
    from interrupt import kill_when, resumed_and_clean

    flowers_subset(tmp_path / "data", per_class=20)
    args = ["features", f"DATA={tmp_path / 'data'}", "BACKBONE=mobilenet_v2", "ALPHA=0.35",
            f"WEIGHTS={MOBILENET_V2_FILE}", "SIZE=64", "VIEWS=4", "BATCH=4", "CHUNK=8"]
    kill_when(args, tmp_path / "killed", lambda f: store.VIEWS in f and int(f[store.VIEWS].attrs["done"]) >= 16)
    a, b = resumed_and_clean(args, tmp_path / "killed", tmp_path / "clean")
    assert a.views.X.tobytes() == b.views.X.tobytes() and a.train.X.tobytes() == b.train.X.tobytes()


def test_grouped_folds_keep_an_images_views_out_of_its_validation_fold():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    view_image = np.repeat(np.arange(20), 2)  # the first 20 clean rows (train) have 2 views each
    n = len(y)
    for fit_rows, val_rows in grouped_folds(y, view_image, 5, 0):
        assert (val_rows < n).all()  # validated on clean rows only
        images_fit = {int(r) if r < n else int(view_image[r - n]) for r in fit_rows}
        assert not images_fit & set(val_rows.tolist())  # no image on both sides
        views_fit = [r for r in fit_rows if r >= n]
        assert len(views_fit) == 2 * len([r for r in fit_rows if r < 20])  # every fit image brings its views
    del rng


def test_a_dense_head_trains_on_views_and_is_evaluated_on_clean_test_rows(flowers, capsys):
    from pipeline import cli

    argv = ["head", "HEAD=dense", "EPOCHS=5", *[f"{k.upper()}={v}" for k, v in opts(flowers).items()],
            f"CACHE_DIR={flowers / 'a'}", f"MODELS_DIR={flowers / 'models'}", f"REPORTS_DIR={flowers / 'reports'}"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    c = pipeline.load_cache(str(next((flowers / "a").glob("*.h5"))))
    assert f"train {len(c.train.labels)} (+{len(c.views.labels)} augmented views)" in out
    assert f"test split ({len(c.test.labels)} images)" in out  # the clean test rows
    import json

    m = json.loads(next((flowers / "reports").glob("*/dense/metrics.json")).read_text())
    assert m["views"] == 3 and m["test"]["n"] == len(c.test.labels)


def test_fewer_views_are_served_by_a_current_cache_with_more(flowers, capsys):
    """VIEWS=2 where only a VIEWS=3 cache of the same configuration exists: its first 2 views, bit-identical to
    a VIEWS=2 extraction, through features, head and finetune; other augmentation options are not served."""
    from pipeline import cli
    from pipeline.cache import extract
    from pipeline.configs import FeaturesConfig, FinetuneConfig, HeadConfig
    from pipeline.errors import PipelineError
    from pipeline.finetune import job
    from pipeline.cache.resolve import resolve_cache

    folder = flowers / "a"
    more = pipeline.features(**opts(flowers), cache_dir=str(folder))  # 3 views (made by the first test)
    msgs = []
    assert extract.run(FeaturesConfig(**opts(flowers, views=2), cache_dir=str(folder)), log=msgs.append) == more
    assert any(m.startswith(f"VIEWS=2: served by {more}") for m in msgs), msgs
    assert len(list(folder.glob("*.h5"))) == 1  # nothing extracted
    fewer = pipeline.load_cache(pipeline.features(**opts(flowers, views=2), cache_dir=str(flowers / "two")))
    assert pipeline.load_cache(more).views.upto(2).X.tobytes() == fewer.views.X.tobytes()

    def resolved(**kw):
        return resolve_cache(HeadConfig(**opts(flowers, **kw), cache_dir=str(folder), extract=False), log=print)

    assert resolved(views=2) == more
    for other in ({"views": 4}, {"views": 2, "rotation": 0.2}, {"views": 2, "seed": 1}, {"views": 2, "size": 32}):
        with pytest.raises(PipelineError, match="no feature cache"):
            resolved(**other)  # more views than it has, or another augmentation or configuration

    argv = ["head", "HEAD=logreg", *[f"{k.upper()}={v}" for k, v in opts(flowers, views=2).items()],
            f"CACHE_DIR={folder}", f"MODELS_DIR={flowers / 'served-models'}", f"REPORTS_DIR={flowers / 'served'}"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"VIEWS=2: served by {more}" in out and f"(+{len(fewer.views.labels)} augmented views)" in out
    import json

    assert json.loads(next((flowers / "served").glob("*/logreg/metrics.json")).read_text())["views"] == 2
    ft = job.prepare(FinetuneConfig(**opts(flowers, views=2), cache_dir=str(folder), extract=False,
                                    models_dir=str(flowers / "ft-models"), reports_dir=str(flowers / "ft")),
                     {"epochs": "1"}, log=lambda m: None)
    assert ft.cache.path == more and ft.head_record["metrics"]["views"] == 2
