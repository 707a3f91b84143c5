"""The checkpoint's tensors converted once into a Keras ``.weights.h5`` file in the Keras cache, verified by
a sidecar of both files' sha256 (a mismatch reconverts). One file per member and top/no top."""

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


def keras_layer_weights(state, include_top=False, name="lite0") -> dict[str, list[np.ndarray]]:
    """The state dict regrouped as {keras layer name: its weights}, kernels transposed to Keras layouts."""
    out = {"stem_conv": _conv(state, "_conv_stem"), "stem_bn": _bn(state, "_bn0"),
           "top_conv": _conv(state, "_conv_head"), "top_bn": _bn(state, "_bn1")}
    for n, (prefix, _, _, _, expand, _) in enumerate(arch.blocks(name)):
        p = f"_blocks.{n}."
        if expand != 1:
            out[f"{prefix}expand_conv"] = _conv(state, p + "_expand_conv")
            out[f"{prefix}expand_bn"] = _bn(state, p + "_bn0")
        out[f"{prefix}dwconv"] = [state[p + "_depthwise_conv.weight"].transpose(2, 3, 0, 1)]  # C1HW -> HWC1
        out[f"{prefix}bn"] = _bn(state, p + "_bn1")
        out[f"{prefix}project_conv"] = _conv(state, p + "_project_conv")
        out[f"{prefix}project_bn"] = _bn(state, p + "_bn2")
    if include_top:
        out["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return out


def _title(name):
    return f"EfficientNet-{name[0].upper()}{name[1:]}"


def _convert(source, target, include_top, name="lite0"):
    """Build the model, load the checkpoint's arrays into it (shapes checked) and save its Keras weights file."""
    state = read_state_dict(source)
    if include_top and "_fc.weight" not in state:
        raise PipelineError(f"{source} has no ImageNet classifier; use include_top=False")
    try:
        layers = keras_layer_weights(state, include_top, name)
    except KeyError as e:
        raise PipelineError(f"{source}: tensor {e} of {_title(name)} is missing") from None
    wanted = [k for k in state if not k.endswith(".num_batches_tracked") and (include_top or not k.startswith("_fc."))]
    if sum(map(len, layers.values())) != len(wanted):
        raise PipelineError(f"{source}: tensors do not map one to one onto {_title(name)}")
    res = arch.member(name).resolution
    model = arch.build(include_top=include_top, input_shape=(res, res, 3), name=name)
    for layer_name, arrays in layers.items():
        layer = model.get_layer(layer_name)
        shapes = [tuple(w.shape) for w in layer.weights]
        if shapes != [a.shape for a in arrays]:
            raise PipelineError(f"{source}: {layer_name} has shapes {[a.shape for a in arrays]}, "
                                f"{_title(name)} needs {shapes}: not this member's checkpoint")
        layer.set_weights(arrays)
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


def weights_path(keras_home=None, include_top=False, name="lite0") -> str:
    """The Keras weights file of member ``name`` converted from its checkpoint, under ``<KERAS_HOME>/models``
    (``efficientnet_<name>_notop.weights.h5``); (re)made when missing.

    A sidecar ``<file>.json`` records the source's and the converted file's sha256; a mismatch reconverts.
    """
    arch.member(name)
    source = checkpoint_path(name)
    models = os.path.join(records.keras_home(keras_home), "models")
    os.makedirs(models, exist_ok=True)
    target = os.path.join(models, f"efficientnet_{name}_{'top' if include_top else 'notop'}.weights.h5")
    sidecar, source_sha = target + ".json", records.file_digest(source)
    if not _sidecar_ok(sidecar, source_sha, target):
        _convert(source, target, include_top, name)
        meta = {"source": source, "source_sha256": source_sha, "sha256": records.file_digest(target)}
        records.write_json(sidecar, meta)
    return target
