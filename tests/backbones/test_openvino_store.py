"""The OpenVINO model stored between runs: read back bit for bit, refused (one warning, converted again) when
its record or files do not check out, and a second RUNTIME=openvino run that finds it extracts without
TensorFlow or Keras; a changed weights file builds again."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import openvino as ov
import pytest
from conftest import MOBILENET_V2_FILE, ROOT, flowers_subset

import pipeline
from pipeline import records
from pipeline.backbones import openvino_store

pytestmark = [pytest.mark.slow, pytest.mark.openvino]

SOURCE = {"backbone": "tiny", "size": 4, "weights_sha256": "0" * 64, "format": openvino_store.FORMAT}


def _tiny_model(scale=1.0):
    """A real OpenVINO model, uint8 (N, 4, 4, 3) pixels -> float32 (N, 3) channel means times weights."""
    import openvino.opset13 as ops

    p = ops.parameter([-1, 4, 4, 3], ov.Type.u8, name="pixels")
    w = ops.constant((np.linspace(0.5, 2.0, 3) * scale).astype(np.float32))
    return ov.Model([ops.reduce_mean(ops.multiply(ops.convert(p, ov.Type.f32), w), ops.constant([1, 2]), False)],
                    [p], "tiny")


def _run(model, x):
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})([x])[0]


def test_a_stored_model_reads_back_bit_for_bit_and_its_record_names_and_hashes_its_files(tmp_path):
    core, msgs = ov.Core(), []
    assert openvino_store.load(str(tmp_path), SOURCE, core, msgs.append) is None and not msgs  # none: silent
    rec_path = openvino_store.save(str(tmp_path), SOURCE, _tiny_model(), msgs.append)
    assert rec_path == os.path.join(tmp_path, "openvino", records.digest(SOURCE) + ".json") and not msgs
    rec = json.loads(open(rec_path).read())
    assert rec["format"] == openvino_store.FORMAT and rec["made_from"] == SOURCE
    folder = os.path.dirname(rec_path)
    for ext in ("xml", "bin"):
        assert rec["sha256"][ext] == records.file_digest(os.path.join(folder, rec["files"][ext]))
    assert sorted(os.listdir(folder)) == sorted([os.path.basename(rec_path), *rec["files"].values()])  # no temp
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    loaded = openvino_store.load(str(tmp_path), SOURCE, core, msgs.append)
    np.testing.assert_array_equal(_run(loaded, x), _run(_tiny_model(), x))
    assert not msgs


@pytest.mark.parametrize("damage", ["bin", "xml", "record", "gone"])
def test_a_damaged_stored_model_is_refused_with_one_warning_and_converted_again(tmp_path, damage):
    core, msgs = ov.Core(), []
    rec_path = openvino_store.save(str(tmp_path), SOURCE, _tiny_model(), msgs.append)
    rec = json.loads(open(rec_path).read())
    target = os.path.join(os.path.dirname(rec_path), rec["files"].get(damage, ""))
    if damage in ("bin", "xml"):
        data = bytearray(open(target, "rb").read())
        data[-8] ^= 0xFF
        open(target, "wb").write(bytes(data))
    elif damage == "record":
        open(rec_path, "w").write(json.dumps({**rec, "made_from": {**SOURCE, "size": 5}}))
    else:
        os.remove(os.path.join(os.path.dirname(rec_path), rec["files"]["bin"]))
    assert openvino_store.load(str(tmp_path), SOURCE, core, msgs.append) is None
    assert len(msgs) == 1 and msgs[0].startswith(f"warning: stored OpenVINO model {rec_path}: ")
    assert msgs[0].endswith("; converting it again") and "\n" not in msgs[0]
    if damage in ("bin", "xml"):
        assert "changed since it was stored" in msgs[0]
    # get() converts again (here: another model) and stores it in place of the damaged one
    model = openvino_store.get(str(tmp_path), SOURCE, lambda: _tiny_model(scale=2.0), core, msgs.append)
    x = np.full((1, 4, 4, 3), 10, np.uint8)
    np.testing.assert_allclose(_run(model, x), [[10.0, 25.0, 40.0]])
    again = openvino_store.load(str(tmp_path), SOURCE, core, msgs.append)
    np.testing.assert_array_equal(_run(again, x), _run(model, x))
    assert len(msgs) == 2  # the refusal, then the failed load inside get(); the fresh one reads back silently
    names = set(json.loads(open(rec_path).read())["files"].values())
    assert set(os.listdir(os.path.dirname(rec_path))) == names | {os.path.basename(rec_path)}  # stale files removed


BLOCKED = """
import json, sys
sys.modules["tensorflow"] = None  # an import of either now raises ImportError
sys.modules["keras"] = None
import pipeline
path = pipeline.features(**json.loads(sys.argv[1]))
print(json.dumps({"path": path, "loaded": sorted(m for m, v in sys.modules.items()
                                                 if v is not None and m.split(".")[0] in ("tensorflow", "keras"))}))
"""


def _blocked(options):
    return subprocess.run([sys.executable, "-c", BLOCKED, json.dumps(options)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _rows(path):
    """{relative path: feature row} of a cache's train split."""
    c = pipeline.load_cache(path)
    return dict(zip(c.train.paths, c.train.X))


def test_a_second_openvino_run_extracts_without_tensorflow_and_changed_weights_build_again(tmp_path):
    weights = tmp_path / "mobilenet_v2.weights.h5"  # Keras reads a weights file by its suffix
    shutil.copy(MOBILENET_V2_FILE, weights)
    common = {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": str(weights), "size": 64, "runtime": "openvino",
              "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.0, "test_fraction": 0.0}
    first = pipeline.features(data=str(flowers_subset(tmp_path / "a", 3)), batch=4, **common)  # built, converted
    stored = sorted((tmp_path / "cache" / "openvino").glob("*.json"))
    assert len(stored) == 1
    # a new image tree, another BATCH (so the first cache lends no rows): every row through the stored model
    second = {"data": str(flowers_subset(tmp_path / "b", 4)), "batch": 5, **common}
    done = _blocked(second)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["path"] != first
    a, b = _rows(first), _rows(out["path"])
    assert len(a) == 15 and len(b) == 20 and set(a) < set(b)
    diff = max(float(np.abs(a[p] - b[p]).max()) for p in a)
    assert diff <= 1e-5 and min(float(np.abs(a[p]).max()) for p in a) > 0.1, diff

    # changed weights: the memo no longer proves the digest, so the extractor is built (TensorFlow needed)
    with h5py.File(weights, "r+") as f:
        dsets = []
        f.visititems(lambda name, obj: dsets.append(obj) if isinstance(obj, h5py.Dataset) and obj.size > 1 else None)
        dsets[0][...] = dsets[0][...] + 0.05
    third = {**second, "data": str(flowers_subset(tmp_path / "c", 4))}  # not up to date under any key
    refused = _blocked(third)
    assert refused.returncode != 0 and "tensorflow" in refused.stderr.lower()
    path = pipeline.features(**third)
    assert pipeline.load_cache(path).key not in (pipeline.load_cache(first).key, pipeline.load_cache(out["path"]).key)
    assert len(list((tmp_path / "cache" / "openvino").glob("*.json"))) == 2  # the new weights' model stored too
    c = _rows(path)
    assert max(float(np.abs(c[p] - b[p]).max()) for p in b) > 1e-3  # really the new weights
