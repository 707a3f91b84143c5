"""predict with a head trained on a RUNTIME=openvino cache: the features come from the cache's stored OpenVINO
model (not a Keras rebuild), so predict's labels on the cache's own test images equal the head's predictions on
the cached features; a scikit-learn head then runs without TensorFlow, and a damaged stored model is converted
again."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, ROOT, flowers_subset

from pipeline import cli

pytestmark = [pytest.mark.slow, pytest.mark.openvino]

HEADS = {"logreg": {}, "dense": {"HIDDEN": "8", "EPOCHS": "5"}}


@pytest.fixture(scope="module")
def flowers_ov(tmp_path_factory):
    """A flowers5 subset (6 photos per class) -> MobileNetV2 alpha 0.35 features at 64 px through OpenVINO (f32)
    -> a logreg and a dense head. Returns (cache path, {head: record path})."""
    from pipeline.cache import extract
    from pipeline.configs import FeaturesConfig, HeadConfig, asdict, replace
    from pipeline.heads import train as head_train

    root = tmp_path_factory.mktemp("flowers_ov")
    fc = FeaturesConfig(data=str(flowers_subset(root / "data", per_class=6)), backbone="mobilenet_v2", alpha=0.35,
                        weights=str(MOBILENET_V2_FILE), size=64, cache_dir=str(root / "cache"), runtime="openvino")
    cache_path = extract.run(fc, log=lambda m: None)
    hc = HeadConfig(**asdict(fc), models_dir=str(root / "models"), reports_dir=str(root / "reports"))
    recs = {name: head_train.run_head(replace(hc, head=name), extra, log=lambda m: None)["record"]
            for name, extra in HEADS.items()}
    return cache_path, recs


def _cached(rec_path, cache_path):
    """(test image files, class names, per-class scores of the head on the cached test features)."""
    from pipeline.cache import store
    from pipeline.heads import artifacts
    from pipeline.heads import registry as heads

    cache = store.load(cache_path)
    assert cache.config["runtime"] == "openvino" and cache.config["precision"] == "float32"
    sp = cache.splits["test"]
    est = artifacts.load_head(rec_path)
    files = [os.path.join(cache.config["source_root"], p) for p in sp.paths]
    return files, [cache.class_names[int(c)] for c in est.classes_], heads.scores(est, sp.features)


def _check(out, files, names, want):
    preds = json.loads(out.read_text())["predictions"]
    assert [p["path"] for p in preds] == files and len(files) >= 5
    for p, row in zip(preds, want):
        assert p["top"][0]["label"] == names[int(np.argmax(row))]  # the cached head's label
        got = {t["label"]: t["probability"] for t in p["top"]}
        np.testing.assert_allclose([got[n] for n in names], row, atol=1e-5)


@pytest.mark.parametrize("head", list(HEADS))
def test_predict_on_an_openvino_cache_equals_the_cached_feature_predictions(flowers_ov, head, tmp_path, capsys):
    from pipeline.serve import find

    cache_path, recs = flowers_ov
    runner = find.open_model(recs[head])
    assert runner.kind == ("dense" if head == "dense" else "sklearn")
    assert runner.source["runtime"] == "openvino"  # the features are OpenVINO's, as the cache's
    files, names, want = _cached(recs[head], cache_path)
    out = tmp_path / "preds.json"
    code = cli.main(["predict", *files, f"MODEL={recs[head]}", "TOP_K=5", f"OUTPUT={out}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"labelled {len(files)} image(s) with {recs[head]} ({head} head on mobilenet_v2 features)" in err
    _check(out, files, names, want)


def test_a_scikit_learn_head_on_an_openvino_cache_predicts_without_tensorflow(flowers_ov, tmp_path):
    cache_path, recs = flowers_ov
    files, names, want = _cached(recs["logreg"], cache_path)
    out = tmp_path / "preds.json"
    script = ("import sys\n"
              "sys.modules['tensorflow'] = None\n"  # an import of either now raises ImportError
              "sys.modules['keras'] = None\n"
              "from pipeline import cli\n"
              "code = cli.main(sys.argv[1:])\n"
              "assert not [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in "
              "('tensorflow', 'keras')]\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script, "predict", *files, f"MODEL={recs['logreg']}", "TOP_K=5",
                           f"OUTPUT={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _check(out, files, names, want)


def test_a_damaged_stored_model_is_converted_again_from_the_checked_weights(flowers_ov, tmp_path, capsys):
    cache_path, recs = flowers_ov
    folder = os.path.join(os.path.dirname(cache_path), "openvino")
    (rec_path,) = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json")]
    rec = json.loads(open(rec_path).read())
    bin_path = os.path.join(folder, rec["files"]["bin"])
    data = bytearray(open(bin_path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(bin_path, "wb").write(bytes(data))
    files, names, want = _cached(recs["logreg"], cache_path)
    out = tmp_path / "preds.json"
    assert cli.main(["predict", *files, f"MODEL={recs['logreg']}", "TOP_K=5", f"OUTPUT={out}"]) == 0
    err = capsys.readouterr().err
    assert f"warning: stored OpenVINO model {rec_path}: {rec['files']['bin']} changed since it was stored" in err
    _check(out, files, names, want)
    again = json.loads(open(rec_path).read())  # stored again, and it checks out
    from pipeline import records

    assert again["sha256"]["bin"] == records.file_digest(os.path.join(folder, again["files"]["bin"]))
