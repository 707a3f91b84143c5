"""Unfreeze policies: which backbone layers fine-tuning trains (``UNFREEZE``), BatchNorm always frozen, and the
parameter counts that show the choice."""

from __future__ import annotations

import re
from dataclasses import dataclass

import keras
import numpy as np

from pipeline.configs import UNFREEZE_HELP
from pipeline.errors import PipelineError
from pipeline.tables import table


@dataclass(frozen=True)
class Unfreeze:
    """A parsed ``UNFREEZE`` value. ``kind``: none | all | layers (last N) | fraction | blocks (last N) |
    name (a layer name or block prefix, and every layer after it)."""

    text: str
    kind: str
    value: object = None


def parse_unfreeze(text) -> Unfreeze:
    """The policy of an ``UNFREEZE`` text; layer and block names are checked later, against the backbone."""
    raw = str(text).strip()
    low = raw.lower()
    if low in ("none", "all"):
        return Unfreeze(raw, low)

    def bad(why):
        return PipelineError(f"UNFREEZE={raw!r}: {why}; valid: {UNFREEZE_HELP}")

    if low.startswith(("blocks:", "layers:")):
        kind, _, n = low.partition(":")
        if not n.isdigit() or int(n) < 1:
            raise bad(f"{kind}:N needs a whole number N >= 1")
        return Unfreeze(raw, kind, int(n))
    if re.fullmatch(r"\d+", low):
        return Unfreeze(raw, "layers", int(low)) if int(low) else Unfreeze(raw, "none")
    if re.fullmatch(r"\d*\.\d+|\d+\.\d*|\d+e-?\d+", low):
        f = float(low)
        if not 0 < f <= 1:
            raise bad("a fraction of the backbone's layers must be in (0, 1]")
        return Unfreeze(raw, "fraction", f)
    if not raw or raw.startswith("-"):
        raise bad("expected a name, a count or a fraction")
    return Unfreeze(raw, "name", raw)


def backbone_layers(base) -> list:
    """The backbone's layers in order, without its input layer: what the policies count."""
    return [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]


def block_names(base, spec) -> list[str]:
    """The backbone's block names in order, by the registry's block pattern (``block_1``.. ``Conv_1``)."""
    rx = re.compile(spec.blocks)
    out = []
    for layer in backbone_layers(base):
        m = rx.match(layer.name)
        if m and m.group(0) not in out:
            out.append(m.group(0))
    return out


def _starts_with(name: str, prefix: str) -> bool:
    """``prefix`` names ``name`` or a block/stage it belongs to: ``block5`` -> ``block5_conv1`` and
    ``block5a_expand``, but ``block_1`` does not name ``block_16_expand``."""
    if name == prefix:
        return True
    if not name.startswith(prefix):
        return False
    nxt = name[len(prefix)]
    return nxt == "_" or (prefix[-1].isdigit() and nxt.isalpha())


def first_trainable(base, spec, policy: Unfreeze) -> int:
    """Index (into :func:`backbone_layers`) of the first layer the policy trains; len(layers) for none."""
    layers = backbone_layers(base)
    n = len(layers)
    if policy.kind == "none":
        return n
    if policy.kind == "all":
        return 0
    if policy.kind == "layers":
        return max(0, n - policy.value)
    if policy.kind == "fraction":
        return n - max(1, min(n, round(policy.value * n)))
    blocks = block_names(base, spec)
    if policy.kind == "blocks":
        if policy.value > len(blocks):
            raise PipelineError(f"UNFREEZE={policy.text}: {spec.name} has {len(blocks)} blocks: "
                                f"{', '.join(blocks)}")
        start = blocks[-policy.value]
        rx = re.compile(spec.blocks)
        return next(i for i, layer in enumerate(layers) if (m := rx.match(layer.name)) and m.group(0) == start)
    for i, layer in enumerate(layers):
        if _starts_with(layer.name, policy.value):
            return i
    raise PipelineError(f"UNFREEZE={policy.text!r}: no layer or block of that name in {spec.name}; its blocks: "
                        f"{', '.join(blocks)} (or a layer name, N, a fraction, blocks:N, all, none)")


def _walk(layer):
    yield layer
    for sub in getattr(layer, "layers", []):
        yield from _walk(sub)


def set_trainable(base, value: bool) -> None:
    """``trainable`` on the backbone and explicitly on every layer in it (Keras 3 does not pass an unchanged
    value on to the layers)."""
    base.trainable = value
    for layer in _walk(base):
        layer.trainable = value


def freeze_batchnorm(base) -> int:
    """Set ``trainable=False`` on every BatchNormalization layer (nested ones too): they then run in
    inference mode and ``fit`` never updates their moving statistics. Returns how many there are."""
    bns = [layer for layer in _walk(base) if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.trainable = False
    return len(bns)


def apply_unfreeze(base, spec, policy: Unfreeze) -> dict:
    """Set the backbone's ``trainable`` flags for ``policy``, BatchNorm always frozen; what was done.
    Recompile the model afterwards."""
    layers = backbone_layers(base)
    k = first_trainable(base, spec, policy)
    set_trainable(base, k < len(layers))
    for i, layer in enumerate(layers):
        if i < k:
            set_trainable(layer, False)
    n_bn = freeze_batchnorm(base)
    return {"unfreeze": policy.text, "from_layer": layers[k].name if k < len(layers) else None,
            "layers_unfrozen": len(layers) - k, "layers": len(layers), "batchnorm_frozen": n_bn}


def count_params(model) -> dict:
    """Total, trainable and non-trainable parameters of the model as its flags stand."""
    t = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    n = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return {"total": t + n, "trainable": t, "non_trainable": n}


def parameter_table(model, base, spec, policy: Unfreeze) -> list[dict]:
    """Parameter counts of three configurations — everything trainable (Keras' default, BatchNorm
    included), frozen base, the chosen policy — leaving the chosen policy applied."""
    rows = []
    set_trainable(base, True)
    rows.append({"configuration": "everything trainable", **count_params(model)})
    set_trainable(base, False)
    rows.append({"configuration": "frozen base", **count_params(model)})
    info = apply_unfreeze(base, spec, policy)
    where = f"from {info['from_layer']}, " if info["from_layer"] else ""
    rows.append({"configuration": f"UNFREEZE={policy.text} ({where}{info['layers_unfrozen']} of "
                                  f"{info['layers']} layers; BatchNorm frozen)", **count_params(model)})
    return rows


def format_table(rows, title="") -> str:
    body = table(("configuration", "total", "trainable", "non-trainable"),
                 [(r["configuration"], f"{r['total']:,}", f"{r['trainable']:,}", f"{r['non_trainable']:,}")
                  for r in rows], align="<>>>")
    return f"{title}\n{body}" if title else body
