"""``QUANTIZE``: every possible format x mode round-trips on real images and is judged on the whole test split in
its own runtime; an export below ``MIN_ACCURACY`` exits 2 and leaves the previous one intact; impossible pairs and
missing packages are one line; a truncated quantised artifact is refused by predict."""

import importlib.util
import json
import os
import time

import numpy as np
import pytest
from test_predict import flowers_models

from pipeline import cli
from pipeline.configs import ExportConfig
from pipeline.errors import PipelineError
from pipeline.serve import export, find, judge

pytestmark = pytest.mark.slow

MODES = [("litert", "float16"), ("litert", "dynamic"), ("litert", "int8"), ("litert", "int8_io"), ("onnx", "float16"),
         ("onnx", "dynamic"), ("onnx", "int8"), ("openvino", "float16"), ("openvino", "int8")]
SHARE = {"float16": 0.65, "dynamic": 0.5, "int8": 0.5, "int8_io": 0.5}  # of the float32 parameters' bytes, at most


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    cache, recs, _ = flowers_models(tmp_path_factory.mktemp("flowers"), {"logreg": {}})
    head = find.open_model(recs["logreg"])
    pixels, labels = judge.test_set(head, "test")
    return cache, recs["logreg"], pixels, labels, head.scores(pixels), head.keras_model().count_params() * 4


@pytest.mark.parametrize("fmt,mode", MODES)
def test_a_quantised_export_round_trips_and_is_judged_in_its_runtime(flowers, fmt, mode, tmp_path):
    _, rec_path, pixels, labels, float_scores, float_bytes = flowers
    said = []
    out = export.run(ExportConfig(model=rec_path, format=fmt, quantize=mode, out=str(tmp_path), latency_runs=2),
                     log=said.append)
    rec = json.loads(open(out).read())
    assert os.path.basename(out) == f"logreg-{fmt}-{mode}.json" and rec["file"].startswith(f"logreg-{fmt}-{mode}-")
    assert rec["quantize"]["mode"] == mode and rec["quantize"]["how"] and "skipped" in rec["verification"]
    assert rec["bytes"] < SHARE[mode] * float_bytes
    j = rec["judgement"]
    runner = find.open_model(out)  # the artifact, checked and run by its own runtime, as predict runs it
    got = runner.scores(pixels)
    assert j["images"] == len(pixels) == len(labels) and j["bytes"] == rec["bytes"]
    assert j["accuracy"] == pytest.approx(np.mean(got.argmax(1) == labels))
    assert j["float_accuracy"] == pytest.approx(np.mean(float_scores.argmax(1) == labels))
    assert j["agreement"] == pytest.approx(np.mean(got.argmax(1) == float_scores.argmax(1)))
    assert j["max_prob_diff"] == pytest.approx(np.max(np.abs(got - float_scores)), abs=1e-3)
    assert j["ms_batch1"] > 0 and j["ms_batch32"] > 0 and j["cpu"] == judge.cpu_name()
    assert j["rows"][1][0] == f"logreg-{fmt}-{mode}" and said[-1].startswith("| model | images | accuracy")
    assert f"| logreg-{fmt}-{mode} | {len(pixels)} |" in said[-1] and "latency: median of the runs on" in said[-1]
    if fmt == "litert":  # int8_io: integer tensors at both ends, quantised and dequantised by the runtime
        from ai_edge_litert.interpreter import Interpreter

        model = Interpreter(model_path=str(tmp_path / rec["file"]))
        ends = [model.get_input_details()[0]["dtype"], model.get_output_details()[0]["dtype"]]
        assert ends == ([np.int8, np.int8] if mode == "int8_io" else [np.float32, np.float32])


def test_a_float_export_is_judged_too_with_judge_1(flowers, tmp_path):
    _, rec_path, pixels, _, _, _ = flowers
    out = export.run(ExportConfig(model=rec_path, format="onnx", judge=True, out=str(tmp_path), latency_runs=1),
                     log=lambda m: None)
    rec = json.loads(open(out).read())
    assert rec["quantize"] == {"mode": "none"} and rec["verification"]["max_abs_diff"] <= 1e-4
    assert rec["judgement"]["agreement"] == 1.0 and rec["judgement"]["max_prob_diff"] <= 1e-4
    assert rec["judgement"]["accuracy"] == rec["judgement"]["float_accuracy"]
    assert rec["judgement"]["images"] == len(pixels)


def test_an_export_below_the_floor_exits_2_and_the_previous_one_stays(flowers, tmp_path, capsys):
    _, rec_path, _, _, _, _ = flowers
    out = tmp_path / "flowers.json"
    args = ["export", f"MODEL={rec_path}", "FORMAT=litert", "QUANTIZE=dynamic", f"OUT={out}", "LATENCY_RUNS=1"]
    assert cli.main(args) == 0
    capsys.readouterr()
    before = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path) if not n.startswith(".")}
    accuracy = json.loads(out.read_text())["judgement"]["accuracy"]
    assert accuracy < 0.9
    assert cli.main([*args, "MIN_ACCURACY=0.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"test accuracy {accuracy:.4f} is {100 * (0.9 - accuracy):.2f} points below " \
                               "MIN_ACCURACY=0.9" in err and "the previous export stays" in err
    after = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path) if not n.startswith(".")}
    assert after == before  # no artifact, no record, nothing staged left
    assert find.open_model(str(out)).kind == "export"
    # a truncated artifact is refused by predict, by name
    artifact = tmp_path / json.loads(out.read_text())["file"]
    artifact.write_bytes(artifact.read_bytes()[:1000])
    assert cli.main(["predict", str(artifact), f"MODEL={out}"]) == 2
    assert "changed since it was exported" in capsys.readouterr().err


def test_max_drop_is_points_below_the_float_model():
    row = {"accuracy": 0.80, "float_accuracy": 0.85, "images": 200}
    judge.check_floor(row, 0.8, 5.0, "x")
    with pytest.raises(PipelineError, match=r"0.8000 is 5.00 points below the float model's 0.8500, 1.00 more "
                                            r"than MAX_DROP=4 \(200 images\)"):
        judge.check_floor(row, 0.0, 4.0, "x")


def test_impossible_pairs_and_missing_packages_are_one_line(flowers, monkeypatch, capsys):
    _, rec_path, _, _, _, _ = flowers
    assert cli.main(["export", f"MODEL={rec_path}", "FORMAT=keras", "QUANTIZE=int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: QUANTIZE=int8 is not possible with FORMAT=keras; possible: ")
    assert "FORMAT=litert: none, float16, dynamic, int8" in err and "FORMAT=openvino: none, float16, int8" in err
    assert cli.main(["export", f"MODEL={rec_path}", "FORMAT=openvino", "QUANTIZE=dynamic"]) == 2
    assert "not possible with FORMAT=openvino" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("nncf", "onnxconverter_common")
                        else real(name, *a))
    for fmt, mode, pip in (("openvino", "int8", "nncf"), ("onnx", "float16", "onnxconverter-common")):
        assert cli.main(["export", f"MODEL={rec_path}", f"FORMAT={fmt}", f"QUANTIZE={mode}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: FORMAT={fmt} QUANTIZE={mode} needs {pip}, not installed: pip install {pip}"


def _near_constant_model(spec, size):
    """Pixels -> [-1, 1] -> a fixed 1x1 convolution -> average: 6 features with a real spread and 6 that are
    the same features times 1e-4 (near-constant, as channels that almost never fire)."""
    import keras

    from pipeline.backbones.layers import Preprocess

    kernel = np.random.default_rng(0).normal(size=(1, 1, 3, 6)).astype(np.float32)
    conv = keras.layers.Conv2D(12, 1, activation="relu", use_bias=False)
    base = keras.Sequential([keras.Input((size, size, 3)), conv])
    conv.set_weights([np.concatenate([kernel, 1e-4 * kernel], axis=-1)])
    x = keras.Input((size, size, 3))
    features = keras.Model(x, keras.layers.GlobalAveragePooling2D()(base(Preprocess(spec.preprocess)(x))))
    return base, features


@pytest.mark.parametrize("fmt", ["onnx", "litert"])
def test_an_int8_linear_head_on_near_constant_features_keeps_its_accuracy(fmt, tmp_path):
    from pipeline.backbones import registry as backbones
    from pipeline.heads import registry as heads
    from pipeline.serve import keras_form, open_export, quantize, verify

    spec, size, rng = backbones.get("mobilenet_v2"), 8, np.random.default_rng(1)
    colours = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220]], np.float32)
    y = np.arange(240) % 3
    pixels = np.clip(colours[y][:, None, None] + rng.normal(0, 60, (240, size, size, 3)), 0, 255).astype(np.uint8)
    base, features = _near_constant_model(spec, size)
    X = features.predict(pixels.astype(np.float32), verbose=0)
    assert np.median(X[:, 6:].std(0)) < 1e-3 * np.median(X[:, :6].std(0))
    est = heads.build("logreg").fit(X[:160], y[:160])
    model = keras_form.linear_model(est, {"head": "logreg"}, spec, size, base, "avg")
    float_acc = np.mean(model.predict(pixels[160:].astype(np.float32), verbose=0).argmax(1) == y[160:])
    target = str(tmp_path / f"head{open_export.FORMATS[fmt].ext}")
    quantize.write(model, open_export.FORMATS[fmt], "int8", target, size, verify.write_artifact,
                   lambda: iter(pixels[:100]))
    got = open_export.runtime(open_export.FORMATS[fmt], target, size)(pixels[160:].astype(np.float32))
    assert float_acc > 0.9 and np.mean(np.asarray(got).argmax(1) == y[160:]) >= float_acc - 0.05


def test_latency_is_per_call_over_enough_calls_to_time_reliably():
    calls = []

    def call(x):
        calls.append(x.shape)
        time.sleep(0.005)

    ms = judge.latency_ms(call, np.zeros((3, 8, 8, 3), np.uint8), batch=4, runs=3)
    assert 5.0 <= ms < 50.0  # one call's time, not a run's
    assert len(calls) > 3 * 10 and set(calls) == {(4, 8, 8, 3)}  # each run many calls, every one a full batch
