"""Augmented views cached once: K views of every train image beside its clean row, deterministic per (image
content, view, SEED), resumable, in the key; heads train on them, evaluation stays on clean rows."""

import os
import signal
import time

import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, flowers_subset

import pipeline
from pipeline.cache import store
from pipeline.heads.sweep import grouped_folds


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
    assert v.X.tobytes() == b.views.X.tobytes()  # the same options, another batch size: bit-identical views
    clean = a.train.X[v.image]
    assert not np.isclose(v.X, clean, atol=1e-3).all(axis=1).any()  # every view differs from its clean row
    assert not np.isclose(v.X[0::3], v.X[1::3], atol=1e-3).all(axis=1).any()  # and from the other views
    with store.h5py.File(a.path) as f:
        assert set(f) == {"train", "val", "test", store.VIEWS}  # val and test have none
    assert len(v.upto(1).labels) == n  # a cache with more views serves fewer


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
    from test_extract import run_cli

    flowers_subset(tmp_path / "data", per_class=20)
    args = ["features", f"DATA={tmp_path / 'data'}", "BACKBONE=mobilenet_v2", "ALPHA=0.35",
            f"WEIGHTS={MOBILENET_V2_FILE}", "SIZE=64", "VIEWS=4", "BATCH=4", "CHUNK=8"]
    proc = run_cli([*args, f"CACHE_DIR={tmp_path / 'killed'}"])
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        partial = list((tmp_path / "killed").glob("*.h5.partial")) if (tmp_path / "killed").exists() else []
        if partial:
            try:  # read while another process writes it: a read can fail, then look again
                with store.h5py.File(partial[0], "r", locking=False) as f:
                    if store.VIEWS in f and int(f[store.VIEWS].attrs["done"]) >= 16:
                        break
            except (OSError, KeyError):
                pass
        time.sleep(0.05)
    assert proc.poll() is None, "extraction finished before it could be killed mid-views"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_cli([*args, f"CACHE_DIR={tmp_path / 'killed'}"])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "resuming" in out, out
    clean = run_cli([*args, f"CACHE_DIR={tmp_path / 'clean'}"])
    assert clean.wait(timeout=300) == 0
    a = pipeline.load_cache(str(next((tmp_path / "killed").glob("*.h5"))))
    b = pipeline.load_cache(str(next((tmp_path / "clean").glob("*.h5"))))
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
