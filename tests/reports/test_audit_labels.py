"""Label issues: planted label flips among real flowers5 photos rank above the clean ones; bad input skips the
section with its reason."""


import numpy as np
import pytest
from audit_data import planted
from sklearn.metrics import roc_auc_score
from synthetic import blobs, write_arrays

from pipeline.cache import store
from pipeline.reports.audit import Skipped, calibration, labels

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return planted(tmp_path_factory, size=160)


def rows_of(cache):
    tr, va = cache.train, cache.val
    return (np.concatenate([tr.X, va.X]), np.concatenate([tr.y, va.y]), np.concatenate([tr.paths, va.paths]),
            np.array(["train"] * len(tr.y) + ["val"] * len(va.y)))


def test_planted_flips_rank_above_clean_images(flowers):
    path, plants = flowers
    cache = store.load(path)
    X, y, paths, splits = rows_of(cache)
    found = labels.find(X, y, cache.class_names, paths, splits, folds=5, seed=0)
    flipped = np.isin(paths, plants["flips"])
    assert flipped.sum() == len(plants["flips"]) == 5
    assert roc_auc_score(flipped, -found["quality"]) >= 0.95
    worst = set(paths[np.argsort(found["quality"])[:10]])
    assert len(worst & set(plants["flips"])) >= 4, "the flips are not among the ten lowest label qualities"
    flagged = {r["path"] for r in found["rows"]}
    assert len(flagged & set(plants["flips"])) >= 3 and len(flagged) < len(y) / 3
    qualities = [r["quality"] for r in found["rows"]]
    assert qualities == sorted(qualities)  # worst first
    suggested = {r["path"]: (r["given"], r["suggested"]) for r in found["rows"] if r["path"] in plants["true"]}
    assert sum(s == plants["true"][p] for p, (_, s) in suggested.items()) >= 3  # the suggestion: its true class
    assert all(g == p.split("/")[1] for p, (g, _) in suggested.items())
    assert np.allclose(found["probs"].sum(axis=1), 1)


def test_out_of_fold_probabilities_are_calibrated_to_the_given_labels(flowers):
    cache = store.load(flowers[0])
    X, y, _, _ = rows_of(cache)
    y = np.searchsorted(np.unique(y), y)
    blend = (labels.logistic_oof(X, y, 3, 0) + labels.discriminant_oof(X, y, 3, 0) + labels.knn_vote(X, y)) / 3
    probs = labels.out_of_fold(X, y, 3, 0)
    assert np.allclose(probs.sum(axis=1), 1) and (probs.argmax(1) == blend.argmax(1)).all()
    assert calibration.nll(probs, y) < calibration.nll(blend, y)
    assert calibration.fit_temperature(probs, y) == pytest.approx(1, abs=0.01)


def test_the_flags_are_the_lowest_qualities_as_many_as_confident_learning_counts(flowers):
    from cleanlab.count import num_label_issues
    cache = store.load(flowers[0])
    X, y, paths, splits = rows_of(cache)
    found = labels.find(X, y, cache.class_names, paths, splits, folds=5, seed=0)
    count = num_label_issues(np.searchsorted(np.unique(y), y), found["probs"][:, np.unique(y)],
                             estimation_method="off_diagonal_calibrated")
    assert 0 < found["flagged"].sum() == count
    assert found["quality"][found["flagged"]].max() <= found["quality"][~found["flagged"]].min()
    assert np.isin(flowers[1]["flips"], paths[found["flagged"]]).sum() >= 4


def test_the_same_seed_gives_the_same_ranking(flowers):
    cache = store.load(flowers[0])
    X, y, paths, splits = rows_of(cache)
    a = labels.find(X, y, cache.class_names, paths, splits, folds=3, seed=1)
    b = labels.find(X, y, cache.class_names, paths, splits, folds=3, seed=1)
    assert np.array_equal(a["quality"], b["quality"]) and a["rows"] == b["rows"]


def test_a_class_with_fewer_images_than_folds_or_one_class_is_skipped_with_its_reason(tmp_path):
    data = blobs(("cat", "dog", "fox"), {"train": [10, 10, 2], "val": [3, 3, 1], "test": 2}, dim=8)
    cache = store.load(write_arrays(tmp_path / "few.h5", ("cat", "dog", "fox"), data))
    X, y, paths, splits = rows_of(cache)
    with pytest.raises(Skipped, match=r"^class fox \(3\) has fewer train\+val images than FOLDS=5; add images "
                                      "or lower FOLDS$"):
        labels.find(X, y, cache.class_names, paths, splits, folds=5)
    assert len(labels.find(X, y, cache.class_names, paths, splits, folds=3)["quality"]) == len(y)
    one = blobs(("cat",), {"train": 12, "val": 4, "test": 4}, dim=8)
    cache = store.load(write_arrays(tmp_path / "one.h5", ("cat",), one))
    X, y, paths, splits = rows_of(cache)
    with pytest.raises(Skipped, match="needs at least two classes"):
        labels.find(X, y, cache.class_names, paths, splits)


def test_a_class_absent_from_train_and_val_keeps_its_column(tmp_path):
    data = blobs(("cat", "dog", "fox"), {"train": [10, 10, 0], "val": [3, 3, 0], "test": 2}, dim=8)
    cache = store.load(write_arrays(tmp_path / "absent.h5", ("cat", "dog", "fox"), data))
    X, y, paths, splits = rows_of(cache)
    found = labels.find(X, y, cache.class_names, paths, splits, folds=3)
    assert found["probs"].shape == (len(y), 3) and (found["probs"][:, 2] == 0).all()
    assert all(r["suggested"] != "fox" for r in found["rows"])
