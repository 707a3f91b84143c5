"""What every runner is: a call on uint8 pixel batches giving per-class scores, and the record formats."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from pipeline.data import images
from pipeline.finetune import artifact
from pipeline.heads import artifacts, calibrate

FINETUNE_FORMAT, HEAD_FORMAT, EXPORT_FORMAT = artifact.FORMAT, artifacts.FORMAT, "pipeline-export/1"
SHA12 = re.compile(r"-[0-9a-f]{12}$")
LINEAR_HEADS = ("logreg", "linear_svm")  # scikit-learn heads that become one Dense layer


# --- a model, whatever it is, as a call on pixel batches -------------------------------------------------------

@dataclass
class Runner:
    """A loaded model ready to label pixels: ``call(uint8 (N, size, size, 3))`` gives its raw outputs, ``scores``
    one column per class (``output``: ``probability``, or ``score`` for decision values), scaled by the record's
    ``temperature`` when it has one; :meth:`unknown` says which rows fall below its ``reject_threshold``. With
    ``sizes`` (a head on a feature ensemble), ``call`` takes a list of batches of the same images, each at its
    member's size, as :func:`pipeline.serve.predict.decode_batches` gives them; ``size`` is the largest, the
    input size of :attr:`keras_model`."""

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
    sizes: tuple = ()  # a feature ensemble's member sizes: ``call`` then takes one pixel batch per member

    @property
    def temperature(self) -> float | None:
        return calibration(self.record)[0]

    @property
    def reject_threshold(self) -> float | None:
        return calibration(self.record)[1]

    def scores(self, pixels) -> np.ndarray:
        raw = expand(np.asarray(self.call(pixels)), self.output)
        return calibrate.apply(raw, self.temperature) if self.output == "probability" else raw

    def unknown(self, scores) -> np.ndarray | None:
        """Which rows of :meth:`scores` are unknown images, or None when the record has no threshold."""
        if self.reject_threshold is None or self.output != "probability":
            return None
        return calibrate.unknown(scores, self.reject_threshold)


def calibration(record: dict) -> tuple[float | None, float | None]:
    """(temperature, unknown-image threshold) of a head, fine-tune or export record; None where it has none
    (records made before ``CALIBRATE``, or without it)."""
    t, r = record.get("temperature"), record.get("reject_threshold")
    return (float(t) if t is not None else None), (float(r) if r is not None else None)


def expand(raw, output="probability") -> np.ndarray:
    """(N, n_classes) float64 of a model's raw outputs: one sigmoid unit -> (1 - p, p), one decision value
    -> (-s, s), as the heads rank them (:func:`pipeline.heads.registry.scores`)."""
    p = np.asarray(raw, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if p.shape[1] == 1:
        p = np.hstack([-p, p] if output == "score" else [1.0 - p, p])
    return p
