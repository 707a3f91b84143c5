"""Calibration and unknown-image rejection: ECE and reliability on known cases, temperature scaling on a
deliberately over-confident head over real flowers5 features, the rejection threshold's recall on val."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from audit_data import planted
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.cache import store
from pipeline.reports.audit import calibration, labels, openset


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return planted(tmp_path_factory, size=96)


def test_ece_and_reliability_on_known_cases():
    y = np.array([0, 1] * 50)
    sure_right = np.eye(2)[y]
    assert calibration.ece(sure_right, y) == 0 and calibration.nll(sure_right, y) < 1e-9
    half_right = np.tile([0.9, 0.1], (100, 1))  # 90% confident, right half of the time
    assert calibration.ece(half_right, y) == pytest.approx(0.4)
    bins = calibration.reliability(half_right, y)
    assert len(bins) == 1 and bins[0]["n"] == 100 and bins[0]["lo"] < 0.9 <= bins[0]["hi"]
    assert bins[0]["accuracy"] == 0.5 and bins[0]["confidence"] == pytest.approx(0.9)


def test_temperature_recovers_a_known_one():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (4000, 4))
    y = np.array([rng.choice(4, p=p) for p in softmax(z / 2.0, axis=1)])
    assert calibration.fit_temperature(z, y) == pytest.approx(2.0, rel=0.1)
    assert calibration.fit_temperature(softmax(z, axis=1), y) == pytest.approx(calibration.fit_temperature(z, y),
                                                                               rel=1e-3)


def test_temperature_lowers_the_nll_of_an_over_confident_head(flowers):
    cache = store.load(flowers[0])
    tr, va, te = cache.train, cache.val, cache.test
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1e4, max_iter=5000)).fit(tr.X, tr.y)
    logits = {s: model.decision_function(sp.X) for s, sp in (("val", va), ("test", te))}
    t = calibration.fit_temperature(logits["val"], va.y)
    assert t > 1.5, "an unregularised head on 74 images is over-confident"
    for s, sp in (("val", va), ("test", te)):
        before, after = softmax(logits[s], axis=1), calibration.scaled(logits[s], t)
        assert calibration.nll(after, sp.y) < calibration.nll(before, sp.y)
        assert np.array_equal(after.argmax(1), before.argmax(1))  # the predictions stay


def test_threshold_gives_the_target_recall_on_val(flowers):
    path, plants = flowers
    cache = store.load(path)
    model = labels.logistic().fit(cache.train.X, cache.train.y)
    gaussians = openset.fit_gaussians(cache.train.X, cache.train.y)
    raw = {s: openset.raw_scores(model.predict_proba(sp.X), sp.X, cache.train.X, gaussians, 10)
           for s, sp in (("val", cache.val), ("test", cache.test))}
    stats = openset.standardiser(raw["val"])
    score = {s: openset.combined(r, stats) for s, r in raw.items()}
    assert abs(score["val"].mean()) < 1e-6
    for recall in (0.95, 0.8, 1.0):
        t = openset.choose_threshold(score["val"], recall)
        kept = (score["val"] >= t).mean()
        assert kept >= recall and ((score["val"] > t).mean() < recall or kept == 1)
        assert openset.rejected(score["val"], t).mean() == pytest.approx(1 - kept)
    t = openset.choose_threshold(score["val"], 0.95)
    digit = list(cache.test.paths).index(plants["digit"])
    assert openset.rejected(score["test"], t)[digit], "the handwritten digit is not rejected as unknown"
    assert openset.choose_threshold(np.arange(1, 101), 0.95) == 6


def test_combined_score_weights_the_standardised_scores_and_ignores_the_plain_similarity():
    stats = {"max_probability": (0.5, 0.25), "relative_similarity": (0.0, 0.5), "relative_mahalanobis": (-4, 2)}
    raw = {"max_probability": np.array([0.75, 0.5, 0.5, 0.5]), "train_similarity": np.array([0.2, 0.9, 0.2, 0.2]),
           "relative_similarity": np.array([0.0, 0.0, 0.5, 0.0]), "relative_mahalanobis": np.array([-4, -4, -4, -2])}
    assert openset.combined(raw, stats) == pytest.approx([0.25, 0, 0.5, 0.25])
    assert sum(openset.WEIGHTS.values()) == pytest.approx(1) and set(openset.WEIGHTS) == set(openset.SCORES)


def test_relative_similarity_corrects_for_the_neighbourhood_density():
    """Two train clusters, a tight one and a loose one: a query as close to the loose cluster as its members are
    to each other looks more known than a query a little outside the tight cluster, though the latter's plain
    similarity to its nearest train images is higher."""
    rng = np.random.default_rng(0)
    centres = np.eye(64)[:2] * 10
    tight = centres[0] + rng.normal(0, 0.5, (50, 64))
    loose = centres[1] + rng.normal(0, 2.5, (50, 64))
    train = np.r_[tight, loose]
    density = openset.train_density(train, 5)
    assert density[:50].mean() > density[50:].mean() + 0.2
    queries = np.r_[centres[0] + rng.normal(0, 1.2, (1, 64)), centres[1] + rng.normal(0, 2.5, (1, 64))]
    gaussians = openset.fit_gaussians(train, np.r_[np.zeros(50), np.ones(50)])
    raw = openset.raw_scores(np.full((2, 2), 0.5), queries, train, gaussians, 5, density)
    assert raw["train_similarity"][0] > raw["train_similarity"][1]
    assert raw["relative_similarity"][1] > raw["relative_similarity"][0]
    assert raw["relative_similarity"] == pytest.approx(openset.raw_scores(np.full((2, 2), 0.5), queries, train,
                                                                          gaussians, 5)["relative_similarity"])


def test_relative_mahalanobis_ranks_a_class_it_never_saw_below_the_known_ones():
    """Three clusters on a shared offset: Gaussians fitted on 12 images of two (fewer than the principal
    components asked for) score fresh images of those two above images of the third."""
    rng = np.random.default_rng(0)
    centres = 3 * np.eye(32)[:3] + 5 * np.ones(32) / np.sqrt(32)
    draw = lambda c, n: centres[c] + rng.normal(0, 0.4, (n, 32))
    gaussians = openset.fit_gaussians(np.r_[draw(0, 6), draw(1, 6)], np.r_[np.zeros(6), np.ones(6)])
    assert gaussians["pca"].n_components_ == 11
    known, unknown = np.r_[draw(0, 20), draw(1, 20)], draw(2, 20)
    scores = openset.relative_mahalanobis(gaussians, np.r_[known, unknown])
    assert roc_auc_score(np.r_[np.ones(40), np.zeros(20)], scores) >= 0.99
