"""The checkpoint's tensors converted once into a Keras ``.weights.h5`` file in the Keras cache, verified by
a sidecar of both files' sha256 (a mismatch reconverts)."""

from __future__ import annotations

import json
import os

import numpy as np

from pipeline import records
from pipeline.backbones.lite import model as arch
from pipeline.backbones.lite.checkpoint import checkpoint_path, read_state_dict
from pipeline.errors import PipelineError


def _bn(state, prefix):
    return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]


def _conv(state, prefix):
    return [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]  # OIHW -> HWIO


def keras_layer_weights(state, include_top=False) -> dict[str, list[np.ndarray]]:
    """The state dict regrouped as {keras layer name: its weights}, kernels transposed to Keras layouts."""
    out = {"stem_conv": _conv(state, "_conv_stem"), "stem_bn": _bn(state, "_bn0"),
           "top_conv": _conv(state, "_conv_head"), "top_bn": _bn(state, "_bn1")}
    for n, (name, _, _, _, expand, _) in enumerate(arch.blocks()):
        p = f"_blocks.{n}."
        if expand != 1:
            out[f"{name}expand_conv"] = _conv(state, p + "_expand_conv")
            out[f"{name}expand_bn"] = _bn(state, p + "_bn0")
        out[f"{name}dwconv"] = [state[p + "_depthwise_conv.weight"].transpose(2, 3, 0, 1)]  # C1HW -> HWC1
        out[f"{name}bn"] = _bn(state, p + "_bn1")
        out[f"{name}project_conv"] = _conv(state, p + "_project_conv")
        out[f"{name}project_bn"] = _bn(state, p + "_bn2")
    if include_top:
        out["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return out


def _convert(source, target, include_top):
    """Build the model, load the checkpoint's arrays into it and save its Keras weights file."""
    state = read_state_dict(source)
    if include_top and "_fc.weight" not in state:
        raise PipelineError(f"{source} has no ImageNet classifier; use include_top=False")
    try:
        layers = keras_layer_weights(state, include_top)
    except KeyError as e:
        raise PipelineError(f"{source}: tensor {e} of EfficientNet-Lite0 is missing") from None
    wanted = [k for k in state if not k.endswith(".num_batches_tracked") and (include_top or not k.startswith("_fc."))]
    if sum(map(len, layers.values())) != len(wanted):
        raise PipelineError(f"{source}: tensors do not map one to one onto EfficientNet-Lite0")
    model = arch.build(include_top=include_top, input_shape=(224, 224, 3))
    for name, arrays in layers.items():
        model.get_layer(name).set_weights(arrays)
    with records.atomic_path(target, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)
        os.chmod(tmp, 0o644)


def _sidecar_ok(sidecar, source_sha, target):
    try:
        with open(sidecar) as f:
            meta = json.load(f)
        return meta["source_sha256"] == source_sha and meta["sha256"] == records.file_digest(target)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def weights_path(keras_home=None, include_top=False) -> str:
    """The Keras weights file converted from the checkpoint, under ``<KERAS_HOME>/models``; (re)made when missing.

    A sidecar ``<file>.json`` records the source's and the converted file's sha256; a mismatch reconverts.
    """
    source = checkpoint_path()
    models = os.path.join(records.keras_home(keras_home), "models")
    os.makedirs(models, exist_ok=True)
    target = os.path.join(models, f"efficientnet_lite0_{'top' if include_top else 'notop'}.weights.h5")
    sidecar, source_sha = target + ".json", records.file_digest(source)
    if not _sidecar_ok(sidecar, source_sha, target):
        _convert(source, target, include_top)
        meta = {"source": source, "source_sha256": source_sha, "sha256": records.file_digest(target)}
        records.write_json(sidecar, meta)
    return target
