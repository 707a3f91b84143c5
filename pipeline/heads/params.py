"""Hyper-parameters of heads: their types (text from the CLI -> value) and :class:`Param`, which names the
estimator parameter a value sets."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import PipelineError


def ints(text):
    """``"1024,512"`` -> (1024, 512); ``""``, ``"0"`` and ``"none"`` -> () (no hidden layer)."""
    if isinstance(text, (tuple, list)):
        return tuple(int(t) for t in text)
    text = str(text).strip().lower()
    if text in ("", "0", "none", "()"):
        return ()
    out = tuple(int(t) for t in text.replace(" ", "").strip("()").split(",") if t)
    if any(n < 1 for n in out):
        raise ValueError(text)
    return out


def _class_weight(text):
    """``balanced`` or ``none``."""
    if text is None:
        return None
    text = str(text).strip().lower()
    if text in ("none", "", "0", "false"):
        return None
    if text == "balanced":
        return "balanced"
    raise ValueError(text)


def _optional_int(text):
    if text is None or str(text).strip().lower() in ("none", "", "0"):
        return None
    return int(text)


def _bool(text):
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


TYPES = {"float": float, "int": int, "ints": ints, "class_weight": _class_weight,
         "optional_int": _optional_int, "bool": _bool, "str": str}
TYPE_HELP = {"ints": "comma list of ints, e.g. 1024,512 (none = no layer)", "class_weight": "balanced | none",
             "optional_int": "int or none", "bool": "0 | 1"}


@dataclass(frozen=True)
class Param:
    default: object
    kind: str  # a key of TYPES
    target: str  # the estimator parameter it sets (``clf__C``, or DenseHead's own name)
    help: str = ""

    def parse(self, name, text):
        try:
            return TYPES[self.kind](text)
        except (TypeError, ValueError):
            want = TYPE_HELP.get(self.kind, self.kind)
            raise PipelineError(f"{name.upper()}={text!r}: expected {want}") from None


def show(v):
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "none"
    return str(v)
