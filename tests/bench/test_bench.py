"""``bench``: a smoke run of every section through the CLI (tiny data, small size), its reports and the
consistency of the ratios it prints. Speed claims are never asserted here: the full bench is run by hand."""

import importlib.util
import json
import math

import pytest
from conftest import make_tree

from pipeline import cli
from pipeline.bench import ceiling, common, overhead


def finite_positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_smoke_run_writes_consistent_reports(tmp_path, capsys):
    data = make_tree(tmp_path / "data", classes=("cat", "dog", "fox"), per_class=8, size=(40, 32))
    argv = ["bench", f"DATA={data}", "BACKBONE=mobilenet_v2", "ALPHA=0.35", "WEIGHTS=none", "SIZE=32",
            "BATCH=4", "N=8", "REPEATS=1", "WARMUP=0", "MEMORY_FACTOR=2", "MATMUL=256",
            "QUALITY=mobilenet_v2:0.35:none", "QUALITY_HEADS=logreg", "RAW_SIZE=8",
            "VAL_FRACTION=0.25", "TEST_FRACTION=0.25", f"CACHE_DIR={tmp_path / 'cache'}",
            f"REPORTS_DIR={tmp_path / 'reports'}", "TAG=smoke"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    [json_path] = (tmp_path / "reports").glob("bench-*-smoke.json")
    [md_path] = (tmp_path / "reports").glob("bench-*-smoke.md")
    r = json.loads(json_path.read_text())
    md = md_path.read_text()

    assert set(r["sections"]) == set(common.SECTIONS)
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"] and {"tensorflow", "keras"} <= set(r["versions"])
    assert r["date"] and r["config"]["n"] == 8 and r["backbone"] == {
        "name": "mobilenet_v2", "size": 32, "alpha": 0.35, "weights": "none", "batch": 4, "pooling": "avg",
        "dtype": "float32"}
    for name, sec in r["sections"].items():
        assert "error" not in sec, (name, sec)
        for key, m in sec["metrics"].items():
            if isinstance(m, dict):
                # a time beyond a separately measured floor is a difference: noise can make it negative
                ok = math.isfinite(m["median"]) if "beyond" in key else finite_positive(m["median"])
                assert ok and m["min"] <= m["median"] <= m["max"], (name, key, m)
                assert m["n"] == len(m["values"]) >= 1 and m["unit"]
        assert name in md and name in out

    o = r["sections"]["overhead"]["metrics"]
    assert o["ratio"] == pytest.approx(o["extract_ips"]["median"] / o["bare_ips"]["median"])
    assert o["run_ratio"] == pytest.approx(o["run_ips"]["median"] / o["bare_ips"]["median"])
    assert o["run_ips"]["median"] <= o["extract_ips"]["median"]  # the whole run includes the extraction
    assert o["own_ratio"]["median"] == pytest.approx(  # the pipeline's own cost, against the folded call
        o["extract_ips"]["median"] / o["folded_ips"]["median"], rel=1e-6)
    assert o["fold_speedup"]["median"] == pytest.approx(o["folded_ips"]["median"] / o["bare_ips"]["median"],
                                                        rel=1e-6)
    assert "BatchNorm folded" in md and o["folded_ips"]["n"] == 1
    _check_combined(o, r["sections"]["overhead"], md)
    assert o["runtime"] == "tensorflow" and o["backbone_call"] == "tensorflow, BatchNorm folded"
    assert o["backbone_ips"]["values"] == o["folded_ips"]["values"]  # extraction's own call: the folded one
    if importlib.util.find_spec("openvino") is not None:  # its figures beside TensorFlow's
        assert o["openvino_speedup"]["median"] == pytest.approx(
            o["openvino_ips"]["median"] / o["folded_ips"]["median"], rel=1e-6)
        assert o["combined_openvino_ips"]["median"] == pytest.approx(
            overhead.combined(o["decode_ips"]["median"], o["openvino_ips"]["median"]))
        assert "OpenVINO f32" in md
    p = r["sections"]["peer"]["metrics"]
    assert p["images"] == 8 and "image_dataset_from_directory" in md
    for run in ("cold", "warm"):
        assert p[f"{run}_ratio"] == pytest.approx(p["peer_s"]["median"] / p[f"{run}_s"]["median"])
        assert p[f"{run}_paired"]["median"] == pytest.approx(p["peer_s"]["values"][0] / p[f"{run}_s"]["values"][0])
    assert p["peer_rss"]["median"] > 100 and p["cold_rss"]["median"] > 100  # MiB: processes that ran TensorFlow
    c = r["sections"]["caching"]["metrics"]
    assert c["ratio"] == pytest.approx(c["guide_epoch_s"]["median"] / c["cached_epoch_s"]["median"])
    if c["guide_epoch_s"]["median"] > c["cached_epoch_s"]["median"]:
        saving = c["guide_epoch_s"]["median"] - c["cached_epoch_s"]["median"]
        assert c["breakeven_epochs"] == pytest.approx(c["extract_once_s"] / saving)
    assert c["extract_once_s"] == pytest.approx(8 / o["run_ips"]["median"])
    h = r["sections"]["headloop"]["metrics"]
    for head in ("logreg", "dense"):  # a whole command costs more than its fit; the ratio is what it prints
        assert h[f"{head}_wall"]["median"] > h[f"{head}_fit"]["median"] > 0
        assert h[f"{head}_ratio"] == pytest.approx(h[f"{head}_wall"]["median"] / h[f"{head}_fit"]["median"])
    assert finite_positive(h["sweep_wall"][0])
    ce = r["sections"]["ceiling"]["metrics"]
    assert finite_positive(ce["gflop_per_image"][0]) and ce["bare_fraction"] == pytest.approx(
        ce["bare_gflops"][0] / ce["matmul_gflops"]["median"])
    assert ce["bare_gflops"][0] == pytest.approx(ce["gflop_per_image"][0] * o["bare_ips"]["median"], rel=1e-6)
    mem = r["sections"]["memory"]["metrics"]
    assert (mem["n_small"], mem["n_large"]) == (8, 16)
    assert mem["ratio"] == pytest.approx(mem["rss_large"]["median"] / mem["rss_small"]["median"])
    assert mem["rss_small"]["median"] > 100  # MiB: a process that imported TensorFlow
    assert finite_positive(r["sections"]["noop"]["metrics"]["command_s"]["median"])

    q = r["sections"]["quality"]["rows"]
    assert [row["label"] for row in q] == ["mobilenet_v2 a0.35 (none)", "mobilenet_v2 random weights (baseline)",
                                          "raw pixels 8x8 (baseline)"]
    for row in q:
        assert "error" not in row and 0 <= row["test"] <= 1 and row["best"] == "logreg"
        assert row["test"] == next(h["test"] for h in row["heads"] if h["head"] == row["best"])
    assert "| quality |" in md and "## Quality: every head" in md


def _check_combined(o, sec, md):
    """The decode-only, backbone-only and combined figures of the overhead section agree with each other."""
    assert finite_positive(o["decode_ips"]["median"]) and o["decode_ips"]["n"] == o["backbone_ips"]["n"]
    assert o["combined_ips"]["median"] == pytest.approx(  # one repeat: the median is that repeat's figure
        overhead.combined(o["decode_ips"]["median"], o["backbone_ips"]["median"]))
    assert o["combined_ips"]["median"] < min(o["decode_ips"]["median"], o["backbone_ips"]["median"])
    assert o["combined_ratio"] == pytest.approx(o["extract_ips"]["median"] / o["combined_ips"]["median"])
    assert o["combined_paired"]["median"] == pytest.approx(o["combined_ratio"])
    assert sec["goal"] == overhead.GOAL == 0.85 and sec["met"] == (o["combined_ratio"] >= 0.85)
    assert "decode only" in md and "combined limit" in md


def test_combined_limit_adds_the_time_per_image():
    assert overhead.combined(100.0, 100.0) == pytest.approx(50.0)
    assert overhead.combined(300.0, 150.0) == pytest.approx(100.0)  # 1/300 + 1/150 s = 1/100 s per image


@pytest.mark.slow
@pytest.mark.openvino
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_overhead_with_openvino_counts_its_call_as_the_backbone(tmp_path, capsys):
    data = make_tree(tmp_path / "data", classes=("cat", "dog"), per_class=4, size=(40, 32))
    argv = ["bench", f"DATA={data}", "BACKBONE=mobilenet_v2", "ALPHA=0.35", "WEIGHTS=none", "SIZE=32", "BATCH=4",
            "N=6", "REPEATS=1", "WARMUP=0", "SECTIONS=overhead", "RUNTIME=openvino",
            f"CACHE_DIR={tmp_path / 'cache'}", f"REPORTS_DIR={tmp_path / 'reports'}", "TAG=ov"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    [json_path] = (tmp_path / "reports").glob("bench-*-ov.json")
    [md_path] = (tmp_path / "reports").glob("bench-*-ov.md")
    r = json.loads(json_path.read_text())
    sec = r["sections"]["overhead"]
    o = sec["metrics"]
    assert "error" not in sec and o["runtime"] == "openvino" and o["backbone_call"] == "openvino f32"
    assert o["backbone_ips"]["values"] == o["openvino_ips"]["values"] and "combined_openvino_ips" not in o
    assert o["openvino_version"]
    _check_combined(o, sec, md_path.read_text())


def test_images_needed_to_amortise_the_start_up():
    # 1 s of start-up, then as fast as bare (100 img/s): N/100 >= 0.9 (1 + N/100) from N = 900
    assert overhead.goal_images(100.0, 100.0, 1.0, 0.9) == 900
    n = overhead.goal_images(100.0, 97.0, 1.7, 0.9)
    assert (n / 100) / (1.7 + n / 97) >= 0.9 > ((n - 1) / 100) / (1.7 + (n - 1) / 97)
    assert overhead.goal_images(100.0, 85.0, 0.5, 0.9) == math.inf  # the steady rate alone misses the goal


def test_flops_are_counted_per_layer():
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 2 * 8*8 * 3*3*3*4
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 2 * 4*4 * 3*3*4
    inner = keras.Model(inputs, x)
    outer_in = keras.Input((8, 8, 3))
    y = keras.layers.GlobalAveragePooling2D()(inner(outer_in))
    y = keras.layers.Dense(5)(y)  # 2 * 4*5
    model = keras.Model(outer_in, y)
    assert ceiling.count_flops(model) == 2 * 64 * 108 + 2 * 16 * 36 + 2 * 20


def test_bad_options_fail_in_one_line(capsys):
    assert cli.main(["bench", "SECTIONS=overhead,speed"]) == 2
    err = capsys.readouterr().err
    assert "SECTIONS='overhead,speed': unknown speed; valid: overhead, caching" in err
    assert cli.main(["bench", "QUALITY=mobilenet_v2:big", "SECTIONS=quality"]) == 2
    assert "alpha 'big' is not a number" in capsys.readouterr().err
