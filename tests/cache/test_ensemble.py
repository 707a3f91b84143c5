"""Feature ensembles (BACKBONE=a+b): members' rows matched by image content whatever order their caches list
them in, a member that lacks images is one line naming it, the joined features normalised per member, and an
ensemble head that trains, saves, reloads and scores as it did; sweep and audit take an ensemble too."""

import hashlib
import json
import os
import shutil

import h5py
import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, flowers_subset

import pipeline
from pipeline import cli
from pipeline.cache import ensemble, reuse, store
from pipeline.configs import HeadConfig
from pipeline.errors import PipelineError
from pipeline.heads import artifacts
from pipeline.heads import registry as heads

pytestmark = pytest.mark.slow

MEMBERS = "mobilenet_v2@64+mobilenet_v2@32"


def _opts(root):
    return {"data": str(root / "data"), "alpha": 0.35, "weights": str(MOBILENET_V2_FILE), "val_fraction": 0.25,
            "test_fraction": 0.25, "batch": 8, "cache_dir": str(root / "cache")}


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """A flowers5 subset (4 photos a class) and its caches through MobileNetV2 0.35 at 64 and at 32 px."""
    root = tmp_path_factory.mktemp("ens")
    flowers_subset(root / "data", per_class=4)
    paths = [pipeline.features(backbone="mobilenet_v2", size=size, **_opts(root)) for size in (64, 32)]
    return root, paths


def _permuted_copy(path, dest, seed=0):
    """A copy of cache ``path`` whose rows are listed in another order in every split (features, labels, paths,
    content hashes and the split's checksum kept consistent)."""
    shutil.copy(path, dest)
    rng = np.random.default_rng(seed)
    with h5py.File(dest, "r+") as f:
        for s in f:
            g = f[s]
            order = rng.permutation(g["labels"].shape[0])
            for col in ("features", "labels", "paths", "skipped", reuse.HASHES):
                g[col][...] = g[col][()][order]
            g.attrs["sha256"] = hashlib.sha256(g["features"][()].tobytes()).hexdigest()
    return str(dest)


def test_rows_line_up_by_image_content_whatever_order_the_members_list_them(members, tmp_path):
    _, (a, b) = members
    shuffled = _permuted_copy(b, tmp_path / "shuffled.h5")
    ca, cb, cs = store.load(a), store.load(b), store.load(shuffled)
    assert not np.array_equal(cs.train.paths, cb.train.paths)  # really another order
    joined = ensemble.join([a, shuffled], MEMBERS, norm="concat")
    for s in ("train", "val", "test"):
        sp = joined.splits[s]
        np.testing.assert_array_equal(sp.paths, ca.splits[s].paths)  # the first member's order
        np.testing.assert_array_equal(sp.labels, ca.splits[s].labels)
        assert sp.features.shape == (len(sp.paths), 2 * 1280)
        np.testing.assert_array_equal(sp.features[:, :1280], ca.splits[s].features)
        row_of = {p: i for i, p in enumerate(cs.splits[s].paths)}  # each image's row in the shuffled member
        np.testing.assert_array_equal(sp.features[:, 1280:], cs.splits[s].features[[row_of[p] for p in sp.paths]])
    again = ensemble.join([a, b], MEMBERS)  # the same members, in their own order: the same features
    np.testing.assert_array_equal(ensemble.join([a, shuffled], MEMBERS).train.features, again.train.features)


def test_a_member_missing_images_is_one_line_naming_it(members, tmp_path):
    root, (a, _) = members
    data = tmp_path / "data"
    shutil.copytree(root / "data", data, symlinks=True)
    gone = sorted((data / "tulip").iterdir())[0]
    gone.unlink()
    short = pipeline.features(**{**_opts(root), "data": str(data), "cache_dir": str(tmp_path / "cache")},
                              backbone="mobilenet_v2", size=32)
    with pytest.raises(PipelineError, match=r"^ensemble member mobilenet_v2@32 \(.*\) does not cover the same "
                                            r"images as mobilenet_v2@64: 1 \w+ image\(s\) missing, e.g. tulip/"):
        ensemble.join([a, short], MEMBERS)


def test_each_member_is_l2_normalised_then_every_column_standardised_on_train(members):
    _, (a, b) = members
    joined = ensemble.join([a, b], MEMBERS)
    tr = joined.train.features
    np.testing.assert_allclose(tr.mean(axis=0), 0, atol=1e-4)
    assert np.allclose(tr.std(axis=0)[tr.std(axis=0) > 0], 1, atol=1e-3)
    ca = store.load(a)
    unit = ca.train.features / np.linalg.norm(ca.train.features, axis=1, keepdims=True)
    want = (unit - unit.mean(axis=0)) / np.where(unit.std(axis=0) > 1e-12, unit.std(axis=0), 1)
    np.testing.assert_allclose(tr[:, :1280], want, atol=1e-4)
    assert joined.key != ensemble.join([a, b], MEMBERS, norm="concat").key


@pytest.mark.parametrize("backbone,match", [
    ("mobilenet_v2+", "an empty member"),
    ("mobilenet_v2@x+mobilenet_v2", "after @ comes the input size"),
    ("mobilenet_v2+resnet9", "unknown backbone 'resnet9'"),
    ("mobilenet_v2@64+mobilenet_v2@64", "a member is named twice")])
def test_bad_ensembles_are_one_line(backbone, match):
    with pytest.raises(PipelineError, match=match):
        ensemble.parse(backbone)


def test_views_or_tta_with_an_ensemble_is_refused():
    with pytest.raises(PipelineError, match="VIEWS and TTA rows are not joined"):
        ensemble.member_configs(HeadConfig(backbone=MEMBERS, views=2))


def _cli(root, *more):
    o = _opts(root)
    return [f"DATA={o['data']}", f"BACKBONE={MEMBERS}", "ALPHA=0.35", f"WEIGHTS={MOBILENET_V2_FILE}",
            "VAL_FRACTION=0.25", "TEST_FRACTION=0.25", "BATCH=8", f"CACHE_DIR={o['cache_dir']}",
            f"MODELS_DIR={root / 'models'}", f"REPORTS_DIR={root / 'reports'}", *more]


def test_an_ensemble_head_trains_saves_and_reloads_from_the_members_caches(members, capsys):
    root, (a, b) = members
    assert cli.main(["head", *_cli(root), "HEAD=logreg"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "ensemble member 2 of 2: mobilenet_v2@32" in out and "up to date" in out  # reused, not extracted
    assert "2560 features" in out
    joined = ensemble.join([a, b], MEMBERS)
    rec_path = artifacts.record_path(str(root / "models"), joined.path, "logreg")
    assert os.path.basename(os.path.dirname(rec_path)).startswith("data_mobilenet_v2_64+mobilenet_v2_32_")
    est, rec = artifacts.load(rec_path, expect_key=joined.key)
    assert rec["config"]["backbone"] == MEMBERS and est.n_features_in_ == 2560
    m = json.loads(open(root / "reports" / os.path.basename(os.path.dirname(rec_path)) / "logreg" /
                        "metrics.json").read())
    te = joined.test
    assert m["test"]["accuracy"] == pytest.approx(float((est.predict(te.features) == te.labels).mean()))
    assert heads.scores(est, te.features).shape == (len(te.labels), 5)
    image = os.path.join(joined.config["source_root"], te.paths[0])
    assert cli.main(["predict", image, f"MODEL={rec_path}"]) == 0  # tests/serve/test_ensemble_serve.py: the rest
    assert f"(logreg head on {MEMBERS} features)" in capsys.readouterr().err


def test_sweep_and_audit_take_an_ensemble(members, capsys):
    root, _ = members
    assert cli.main(["sweep", *_cli(root), "HEADS=logreg", "CV=2", "JOBS=1"]) == 0, capsys.readouterr().err
    assert "best" in capsys.readouterr().out.lower()
    audit = [a for a in _cli(root) if not a.startswith("MODELS_DIR=")]
    assert cli.main(["audit", *audit, "FOLDS=2", "NEIGHBOURS=3"]) == 0, capsys.readouterr().err
    page = next((root / "reports").rglob("audit/index.html"))
    assert "+mobilenet_v2_32_" in str(page)
