"""The ``export`` bench section on a tiny real cache (a few flowers5 photos per class, MobileNetV2 0.35 at 32 px):
each chosen format x mode written, run by its own runtime and judged on the whole test split, with the float32
export of each format as the reference of the ratios, one table and a verdict per goal mode. The goals are not
asserted (tiny data)."""

import json

import pytest
from conftest import MOBILENET_V2_FILE, flowers_subset

from pipeline import cli
from pipeline.bench import export


@pytest.mark.slow
def test_export_section_judges_every_chosen_pair(tmp_path, capsys):
    data = flowers_subset(tmp_path / "data", per_class=8)
    argv = ["bench", "SECTIONS=export", f"EXPORT_DATA={data}", "EXPORT_FORMATS=litert:int8,onnx:dynamic",
            "BACKBONE=mobilenet_v2", "ALPHA=0.35", "SIZE=32", f"WEIGHTS={MOBILENET_V2_FILE}", "BATCH=16",
            "VAL_FRACTION=0.25", "TEST_FRACTION=0.25", "REPEATS=2", f"CACHE_DIR={tmp_path / 'cache'}",
            f"REPORTS_DIR={tmp_path / 'reports'}", "TAG=ex"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    [path] = (tmp_path / "reports").glob("bench-*-ex.json")
    sec = json.loads(path.read_text())["sections"]["export"]
    assert "error" not in sec, sec
    d = sec["datasets"]["data"]
    rows = {(r["format"], r["mode"]): r for r in d["rows"]}
    assert list(rows) == [("litert", "none"), ("litert", "int8"), ("onnx", "none"), ("onnx", "dynamic")]
    assert d["test_images"] >= 5 and d["classes"] == 5  # the whole test split
    for key, row in rows.items():
        assert "error" not in row, (key, row)
        assert row["images"] == d["test_images"] and 0 <= row["accuracy"] <= 1 and 0 <= row["agreement"] <= 1
        assert row["float_accuracy"] == d["float_accuracy"] and row["max_prob_diff"] >= 0
        assert row["bytes"] > 0 and row["ms_batch1"] > 0 and row["ms_batch32"] > 0 and row["runs"] == 2
    for fmt in ("litert", "onnx"):  # float32 exports agree with the Keras model
        assert rows[fmt, "none"]["agreement"] == 1.0 and rows[fmt, "none"]["max_prob_diff"] < 1e-4
    assert rows["litert", "int8"]["bytes"] < rows["litert", "none"]["bytes"]
    assert [v[0] for v in sec["verdicts"]] == ["goal: data litert int8", "goal"]  # dynamic has no goal
    assert sec["verdicts"][0][1].startswith(("met: drop", "NOT met: drop")) and "batch1" in sec["verdicts"][0][1]
    assert isinstance(sec["met"], bool)
    table = (tmp_path / "reports" / "bench-export-ex.md").read_text()
    assert table.count("| data | ") == 1 + 4 and "size vs float32" in table and sec["table"] in table  # header + rows
    for text in ("data litert int8: test accuracy", "goal: data litert int8", "| data | onnx | dynamic |"):
        assert text in out, text


@pytest.mark.parametrize("formats, message", [("keras", "the format is one of litert, onnx, openvino"),
                                              ("openvino:dynamic", "QUANTIZE=dynamic is not possible"),
                                              ("onnx:int4", "QUANTIZE=int4: one of")])
def test_export_formats_are_checked(formats, message, capsys):
    assert cli.main(["bench", "SECTIONS=export", f"EXPORT_FORMATS={formats}"]) == 2
    assert message in capsys.readouterr().err


def test_pairs_put_the_float_reference_first():
    assert export.pairs("onnx:int8,litert:float16+int8") == [("onnx", "none"), ("onnx", "int8"), ("litert", "none"),
                                                             ("litert", "float16"), ("litert", "int8")]
    assert export.pairs("openvino") == [("openvino", "none"), ("openvino", "float16"), ("openvino", "int8")]
