"""``export``: every format Keras exports, loaded back with its own runtime and verified before it is reported
done; ``predict`` runs the artifact; a changed artifact is refused; a linear scikit-learn head becomes a Dense
layer equal to the estimator; heads without a Keras form, a missing runtime and a failed verification are one
line each."""

import importlib.util
import json
import os
import shutil
import subprocess

import keras
import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, ROOT, write_image
from test_predict import cached_scores, flowers_models

from pipeline import cli, records
from pipeline.serve import export
from pipeline.backbones import registry as backbones
from pipeline.configs import ExportConfig
from pipeline.data import images
from pipeline.errors import PipelineError
from pipeline.finetune import artifact
from pipeline.finetune import model as ft_model
from pipeline.heads import artifacts, dense
from pipeline.serve import open_export as formats
from pipeline.serve import find

pytestmark = pytest.mark.slow

FORMATS = ["keras", "tf_saved_model", "onnx", "litert", "openvino"]
HEADS = {"dense": {"HIDDEN": "8", "EPOCHS": "5"}, "logreg": {}, "linear_svm": {}, "knn": {}}


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return flowers_models(tmp_path_factory.mktemp("flowers"), HEADS)


def runtime_installed(fmt):
    spec = formats.FORMATS[fmt]
    for m in (spec.runtime, *spec.export_needs):
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed (pip install -e '.[{spec.extra}]')")


@pytest.fixture(scope="module")
def exports(flowers, tmp_path_factory):
    """The dense head exported in every format whose runtime is installed: {format: (record path, log)}."""
    out = tmp_path_factory.mktemp("exports")
    _, recs, _ = flowers
    made = {}
    for fmt in FORMATS:
        spec = formats.FORMATS[fmt]
        if any(importlib.util.find_spec(m) is None for m in (spec.runtime, *spec.export_needs)):
            continue
        said = []
        made[fmt] = (export.run(ExportConfig(model=recs["dense"], format=fmt, out=str(out / fmt)), log=said.append),
                     said)
    return made


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_round_trip_is_verified_and_predicts_like_the_head(flowers, exports, fmt, tmp_path, capsys):
    runtime_installed(fmt)
    cache_path, recs, _ = flowers
    rec_path, said = exports[fmt]
    rec = json.loads(open(rec_path).read())
    spec = formats.FORMATS[fmt]
    files, names, want = cached_scores(recs["dense"], cache_path)
    assert rec["format"] == "pipeline-export/1" and rec["export_format"] == fmt and rec["classes"] == names
    assert rec["input"]["shape"] == [None, 64, 64, 3] and rec["input"]["dtype"] == "float32"
    assert rec["file"] == f"dense-{fmt}-{rec['sha256'][:12]}{spec.ext}" and rec["output"] == "probability"
    path = os.path.join(os.path.dirname(rec_path), rec["file"])
    assert os.path.isdir(path) == spec.folder and formats.tree_digest(path)[0] == rec["sha256"]
    v = rec["verification"]
    assert v["images"] == len(files) and v["max_abs_diff"] <= 1e-4 and v["argmax_agree"] == len(files)
    assert f"max abs difference {v['max_abs_diff']:.2e} from the Keras model" in said[-2]
    assert rec["runtime"]["name"] == spec.runtime and rec["runtime"]["version"]
    assert rec["source"]["record"] == os.path.abspath(recs["dense"]) and rec["source"]["kind"] == "dense"
    assert sorted(os.listdir(os.path.dirname(rec_path))) == sorted([".export.lock", f"dense-{fmt}.json",
                                                                     f"dense-{fmt}.MODEL_CARD.md", rec["file"]])
    # make predict runs the artifact itself (its runtime, from its record): the head's labels and probabilities
    out = tmp_path / "preds.json"
    assert cli.main(["predict", *files, f"MODEL={path}", "TOP_K=5", f"OUTPUT={out}"]) == 0
    assert f"({fmt} export, {spec.runtime})" in capsys.readouterr().err
    for p, row in zip(json.loads(out.read_text())["predictions"], want):
        assert p["top"][0]["label"] == names[int(np.argmax(row))]
        got = {t["label"]: t["probability"] for t in p["top"]}
        np.testing.assert_allclose([got[n] for n in names], row, atol=1e-4)


def test_a_changed_export_is_refused(exports, tmp_path, capsys):
    for fmt in ("onnx", "tf_saved_model"):
        if fmt not in exports:
            continue
        folder = tmp_path / fmt
        shutil.copytree(os.path.dirname(exports[fmt][0]), folder)
        rec_path = str(folder / f"dense-{fmt}.json")
        rec = json.loads(open(rec_path).read())
        target = folder / rec["file"]
        if fmt == "onnx":
            with open(target, "ab") as f:
                f.write(b"\0")
            changed = ""
        else:
            victim = next(p for p in sorted((target / "variables").iterdir()) if "data" in p.name)
            with open(victim, "r+b") as f:
                f.seek(100)
                byte = f.read(1)
                f.seek(100)
                f.write(bytes([byte[0] ^ 1]))
            changed = f"(variables/{victim.name})"
        code = cli.main(["predict", str(ROOT / "tests" / "conftest.py"), f"MODEL={rec_path}"])
        err = capsys.readouterr().err
        assert code == 2 and "changed since it was exported" in err and changed in err, err
        with pytest.raises(PipelineError, match="changed since it was exported"):
            find.open_model(str(target))
    if "tf_saved_model" in exports:  # a file added to the folder counts too
        folder = tmp_path / "added"
        shutil.copytree(os.path.dirname(exports["tf_saved_model"][0]), folder)
        rec = json.loads(open(folder / "dense-tf_saved_model.json").read())
        (folder / rec["file"] / "extra.pb").write_bytes(b"x")
        with pytest.raises(PipelineError, match=r"changed since it was exported \(extra.pb\)"):
            find.open_model(str(folder / "dense-tf_saved_model.json"))


@pytest.mark.parametrize("head", ["logreg", "linear_svm"])
def test_a_linear_head_exported_as_keras_equals_the_estimator(flowers, head, tmp_path):
    cache_path, recs, _ = flowers
    rec_path = export.run(ExportConfig(model=recs[head], format="keras", out=str(tmp_path)), log=quiet)
    rec = json.loads(open(rec_path).read())
    assert rec["output"] == ("probability" if head == "logreg" else "score")
    assert rec["verification"]["max_abs_diff"] <= 1e-4
    from pipeline.backbones import layers  # noqa: F401  the .keras file's two layers

    model = keras.saving.load_model(os.path.join(tmp_path, rec["file"]), safe_mode=True)
    features = keras.Model(model.input, model.get_layer("avg_pool").output)
    est = artifacts.load_head(recs[head])
    files, _, _ = cached_scores(recs[head], cache_path)
    from pipeline.data import images

    x = np.stack([images.load_resized(f, 64) for f in files]).astype(np.float32)
    f = features(x, training=False).numpy()
    got = model(x, training=False).numpy()
    want = est.predict_proba(f) if head == "logreg" else est.decision_function(f)  # softmax(decision) = proba
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (got.argmax(1) == np.searchsorted(est.classes_, est.predict(f))).all()


def test_a_fine_tuned_model_exports_and_a_non_linear_head_is_refused(flowers, tmp_path, capsys):
    runtime_installed("onnx")
    spec = backbones.get("mobilenet_v2")
    base = backbones.build_base(spec, 32, str(MOBILENET_V2_FILE), alpha=0.35)
    keras.utils.set_random_seed(1)
    model = ft_model.build_model(spec, 32, base, "avg", dense.build_model(1280, 3, (8,)), ft_model.augmentation())
    tuned = artifact.export(model, str(tmp_path / "m" / "finetune.keras"), class_names=["a", "b", "c"], size=32)
    photos = [str(write_image(tmp_path / "photos" / f"p{i}.png", (40 * i, 90, 200), seed=i)) for i in range(3)]
    code = cli.main(["export", f"MODEL={tuned}", "FORMAT=onnx", f"IMAGES={tmp_path / 'photos'}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rec_path = str(tmp_path / "m" / "export" / "finetune-onnx.json")
    rec = json.loads(open(rec_path).read())
    assert rec["source"]["kind"] == "finetune" and rec["verification"]["on"] == "3 given image(s)"
    runner = find.open_model(rec_path)
    pixels = np.stack([images.load_resized(p, 32) for p in photos])
    np.testing.assert_allclose(runner.scores(pixels), model(pixels.astype(np.float32), training=False).numpy(),
                               atol=1e-4)
    # no Keras form: a one-line refusal naming the heads that export
    _, recs, _ = flowers
    code = cli.main(["export", f"MODEL={recs['knn']}", "FORMAT=keras"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: HEAD=knn: a knn head has no Keras form") and "\n" not in err
    assert "dense and the linear logreg, linear_svm" in err
    assert cli.main(["export", f"MODEL={rec_path}", "FORMAT=onnx"]) == 2  # an export is not exported again
    assert "already an export" in capsys.readouterr().err


def test_augmentation_is_taken_out_of_a_chain_and_a_branched_model_is_refused():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="pixels")
    dense_ = keras.layers.Dense(2, name="d")
    x = dense_(keras.layers.RandomFlip(name="augment")(inputs))
    chain = keras.Model(inputs, keras.layers.Flatten(name="flatten")(x), name="chain")
    out = export.without_augmentation(chain)
    assert [layer.name for layer in out.layers][1:] == ["d", "flatten"] and out.layers[1] is dense_
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(out(pixels), chain(pixels, training=False), atol=1e-6)
    a = keras.layers.RandomFlip(name="augment")(inputs)
    branched = keras.Model(inputs, keras.layers.Add()([keras.layers.Dense(3)(a), a]), name="branched")
    with pytest.raises(PipelineError, match="branched: not a chain of layers"):
        export.without_augmentation(branched)


def test_a_missing_runtime_or_a_failed_verification_is_one_line_and_nothing_is_saved(flowers, tmp_path,
                                                                                     monkeypatch, capsys):
    _, recs, _ = flowers
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    code = cli.main(["export", f"MODEL={recs['dense']}", "FORMAT=onnx", f"OUT={tmp_path / 'x'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("error: FORMAT=onnx needs onnxruntime, not installed: pip install 'pipeline[onnx]'")
    monkeypatch.undo()
    runtime = formats.runtime
    monkeypatch.setattr(formats, "runtime", lambda *a, **k: (lambda x, call=runtime(*a, **k): call(x) + 1e-3))
    code = cli.main(["export", f"MODEL={recs['dense']}", "FORMAT=keras", f"OUT={tmp_path / 'y'}"])
    err = capsys.readouterr().err
    assert code == 2 and "differ from the Keras model's by up to 0.001" in err and "not saved" in err
    assert sorted(os.listdir(tmp_path / "y")) == [".export.lock"]  # no artifact, no temporary folder, no record


def test_a_kill_before_the_record_keeps_the_previous_export(flowers, tmp_path, monkeypatch):
    _, recs, _ = flowers
    cfg = ExportConfig(model=recs["logreg"], format="keras", out=str(tmp_path / "logreg.json"))
    rec_path = export.run(cfg, log=quiet)
    before = open(rec_path, "rb").read()

    def killed(*a, **k):
        raise KeyboardInterrupt()

    monkeypatch.setattr(records, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):  # the new artifact is in place, its record is not
        export.run(cfg, log=quiet)
    monkeypatch.undo()
    assert open(rec_path, "rb").read() == before
    runner = find.open_model(rec_path)  # the previous artifact, checked
    assert runner.kind == "export" and len([f for f in os.listdir(tmp_path) if f.endswith(".keras")]) == 2
    rec_path = export.run(cfg, log=quiet)  # the next export removes what no record names
    rec = json.loads(open(rec_path).read())
    assert sorted(os.listdir(tmp_path)) == sorted([".export.lock", "logreg.json", "logreg.MODEL_CARD.md", rec["file"]])


def test_make_passes_the_export_options():
    out = subprocess.run(["make", "-n", "export", "MODEL=models/x/dense.json", "FORMAT=onnx", "OUT=dist/"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-m pipeline export 'FORMAT=onnx' 'MODEL=models/x/dense.json' 'OUT=dist/'" in out
    cfg, _ = cli.parse("export", cli._steps()["export"], ["FORMAT=litert", "VERIFY_IMAGES=8", "TOLERANCE=1e-5"])
    assert (cfg.format, cfg.verify_images, cfg.tolerance) == ("litert", 8, 1e-5)
    assert cli.main(["export", "FORMAT=torch"]) == 2
