"""What every runner is: a call on uint8 pixel batches giving per-class scores, and the record formats."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from pipeline.data import images
from pipeline.finetune import artifact
from pipeline.heads import artifacts

FINETUNE_FORMAT, HEAD_FORMAT, EXPORT_FORMAT = artifact.FORMAT, artifacts.FORMAT, "pipeline-export/1"
SHA12 = re.compile(r"-[0-9a-f]{12}$")
LINEAR_HEADS = ("logreg", "linear_svm")  # scikit-learn heads that become one Dense layer


# --- a model, whatever it is, as a call on pixel batches -------------------------------------------------------

@dataclass
class Runner:
    """A loaded model ready to label pixels: ``call(uint8 (N, size, size, 3))`` gives its raw outputs, ``scores``
    one column per class (``output``: ``probability``, or ``score`` for decision values)."""

    path: str  # the record
    record: dict
    kind: str  # finetune | dense | sklearn | export
    classes: list
    size: int
    interpolation: str
    output: str  # probability | score
    call: object
    notes: list = field(default_factory=list)
    keras_model: object = None  # () -> the end-to-end Keras model, float32, as built (what make export exports)
    source: dict = field(default_factory=dict)  # what the record says about its backbone and cache
    max_pixels: int = images.MAX_PIXELS

    def scores(self, pixels) -> np.ndarray:
        return expand(np.asarray(self.call(pixels)), self.output)


def expand(raw, output="probability") -> np.ndarray:
    """(N, n_classes) float64 of a model's raw outputs: one sigmoid unit -> (1 - p, p), one decision value
    -> (-s, s), as the heads rank them (:func:`pipeline.heads.registry.scores`)."""
    p = np.asarray(raw, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if p.shape[1] == 1:
        p = np.hstack([-p, p] if output == "score" else [1.0 - p, p])
    return p
