"""pipeline.Embedder: image paths -> cached features as a scikit-learn transformer, on real flowers5 photos and
the real MobileNetV2-0.35 weights at 64 px; the scikit-learn estimator checks that apply to paths."""

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils import estimator_checks as checks

from conftest import FLOWERS, MOBILENET_V2_FILE, flowers_subset

import pipeline
from pipeline.errors import PipelineError

WROTE = re.compile(r"^wrote .*; (\d+) images in ", re.M)


def embedder(cache_dir, **kw):
    return pipeline.Embedder(**{"backbone": "mobilenet_v2", "alpha": 0.35, "weights": str(MOBILENET_V2_FILE),
                                "size": 64, "cache_dir": str(cache_dir), **kw})


def labelled(tree):
    """(paths, labels) of every image of class-folder ``tree``, in a shuffled order."""
    paths = sorted(str(p) for p in Path(tree).glob("*/*.jpg"))
    order = np.random.default_rng(0).permutation(len(paths))
    paths = [paths[i] for i in order]
    return paths, [Path(p).parent.name for p in paths]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return flowers_subset(tmp_path_factory.mktemp("embedder") / "data", per_class=6)  # 30 photos


@pytest.fixture(scope="module")
def cache_dir(tree):
    return tree.parent / "cache"


def test_the_checks_on_parameters_hold_and_clone_works():
    est = pipeline.Embedder(backbone="mobilenet_v2", size=64, alpha=0.35, data="somewhere")
    checks.check_parameters_default_constructible("Embedder", est)
    checks.check_no_attributes_set_in_init("Embedder", est)
    checks.check_get_params_invariance("Embedder", est)
    checks.check_set_params("Embedder", est)
    checks.check_do_not_raise_errors_in_init_or_set_params("Embedder", est)
    params = est.get_params()
    assert params == {"backbone": "mobilenet_v2", "size": 64, "pooling": "avg", "weights": "imagenet",
                      "alpha": 0.35, "cache_dir": "cache", "data": "somewhere", "verbose": True}
    twin = clone(est)
    assert twin is not est and twin.get_params() == params
    assert pipeline.Embedder(**params).get_params() == params
    assert clone(est.set_params(size=96, pooling="max")).get_params() == {**params, "size": 96, "pooling": "max"}
    assert vars(pipeline.Embedder()) == pipeline.Embedder().get_params()  # __init__ stores its arguments only


def test_a_pipeline_fits_and_predicts_and_its_rows_are_the_caches_by_path(tree, cache_dir, capsys):
    paths, labels = labelled(tree)
    model = make_pipeline(embedder(cache_dir, data=str(tree)), LogisticRegression(max_iter=2000))
    model.fit(paths[:24], labels[:24])
    assert model.score(paths[:24], labels[:24]) == 1.0  # 1,280 real features, 24 photos: separable
    predicted = model.predict(paths[24:])
    assert predicted.shape == (6,) and set(predicted) <= set(labels)
    assert [int(n) for n in WROTE.findall(capsys.readouterr().out)] == [30]  # the tree's photos, once

    emb = model[0]
    cache = pipeline.load_cache(emb.cache_)
    by_path = {str(p): row for s in cache.splits.values() for p, row in zip(s.paths, s.features)}
    reverse = paths[::-1]
    X = emb.transform(reverse)
    assert X.dtype == np.float32 and X.shape == (30, emb.n_features_out_) == (30, 1280)
    expected = np.stack([by_path[str(Path(p).relative_to(tree))] for p in reverse])
    np.testing.assert_array_equal(X, expected)  # matched by path, in input order, not by position
    np.testing.assert_array_equal(emb.transform(np.asarray(reverse)[:, None]), expected)  # an (n, 1) column
    assert list(emb.get_feature_names_out()[[0, -1]]) == ["embedder0", "embedder1279"]
    assert "wrote" not in capsys.readouterr().out


def test_the_checks_run_on_paths_hold(tree, cache_dir):
    paths, _ = labelled(tree)
    est = embedder(cache_dir, verbose=False)  # no data=: the one tree of the paths
    with pytest.raises(NotFittedError):
        est.transform(paths)
    before = est.get_params()
    X = est.fit_transform(paths[:10])
    assert est.get_params() == before  # check_estimators_overwrite_params
    assert est.data_ == str(tree) and Path(est.cache_).parent == cache_dir
    assert {k for k in vars(est) if k not in before} == {"data_", "config_", "cache_", "n_features_out_"}
    state = pickle.dumps(vars(est))
    np.testing.assert_array_equal(est.transform(paths[:10]), X)  # check_transformer_general
    assert pickle.dumps(vars(est)) == state  # check_dict_unchanged
    np.testing.assert_array_equal(est.fit(paths[:10]).transform(paths[5:]), est.fit(paths[:10]).transform(paths[5:]))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(est)).transform(paths[:3]), X[:3])
    assert not hasattr(clone(est), "data_")  # a clone is unfitted


def test_bad_input_is_a_one_line_error(tree, cache_dir, tmp_path):
    paths, _ = labelled(tree)
    est = embedder(cache_dir, data=str(tree), verbose=False).fit(paths[:5])
    outside = shutil.copy(paths[0], tmp_path / "elsewhere.jpg")
    with pytest.raises(PipelineError, match=r"elsewhere.jpg: not an image of the Embedder's tree .*data="):
        est.transform([paths[0], outside])
    with pytest.raises(PipelineError, match="list of image paths, not one path"):
        est.transform(paths[0])
    with pytest.raises(PipelineError, match="not in one class-folder tree .* set data="):
        embedder(cache_dir).fit([paths[0], outside])
    with pytest.raises(PipelineError, match="data=.*no such folder"):
        embedder(cache_dir, data=str(tmp_path / "missing")).fit(paths)
    (tree / "notes.txt").write_text("not an image")
    try:
        with pytest.raises(PipelineError, match=r"notes.txt: not in the cache .*1 path\(s\) missing"):
            est.transform([str(tree / "notes.txt")])
    finally:
        (tree / "notes.txt").unlink()


def test_a_grid_search_extracts_each_image_once_and_a_new_image_alone(tmp_path, capsys):
    data = flowers_subset(tmp_path / "data", per_class=6)
    paths, labels = labelled(data)
    search = GridSearchCV(make_pipeline(embedder(tmp_path / "cache"), LogisticRegression(max_iter=2000)),
                          {"logisticregression__C": [0.1, 1.0, 10.0]}, cv=3)
    search.fit(paths, labels)
    out = capsys.readouterr().out
    assert [int(n) for n in WROTE.findall(out)] == [30]  # the first fit; every later fit and transform:
    assert out.count("up to date: ") == 3 * 3 * 2 + 1 - 1  # 9 fits + 9 scorings + the refit, less the first
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 1
    assert search.predict(paths[:4]).shape == (4,)
    capsys.readouterr()

    cls = sorted(p.name for p in FLOWERS.iterdir())[0]
    new = data / cls / "new.jpg"
    new.symlink_to(sorted((FLOWERS / cls).iterdir())[-1])  # a photo the cache lacks
    emb = search.best_estimator_[0]
    X = emb.transform([str(new), paths[0]])
    out = capsys.readouterr().out
    assert "reused 30 rows" in out and [int(n) for n in WROTE.findall(out)] == [1]  # only the new photo
    np.testing.assert_array_equal(X[1], emb.fit_transform([paths[0]])[0])
