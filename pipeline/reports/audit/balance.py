"""Class balance: images per class and split, and a warning when the largest class of train is more than
``RATIO`` times the smallest."""

from __future__ import annotations

import numpy as np

RATIO = 3.0


def counts(cache) -> dict:
    """{split: [images per class]} in class order."""
    n = len(cache.class_names)
    return {s: np.bincount(sp.labels, minlength=n).tolist() for s, sp in cache.splits.items()}


def warning(per_split: dict, names, ratio=RATIO) -> str | None:
    """A one-line warning naming the classes and CLASS_WEIGHT=balanced when train's largest class holds more
    than ``ratio`` x its smallest (a class with no train image counts as the smallest); else None."""
    train = np.asarray(per_split.get("train") or [])
    if len(train) < 2:
        return None
    big, small = int(np.argmax(train)), int(np.argmin(train))
    if train[big] <= ratio * train[small]:
        return None
    return (f"train is imbalanced: {names[big]} has {train[big]} images, {names[small]} {train[small]} "
            f"(more than {ratio:g}x); train heads with CLASS_WEIGHT=balanced (make head CLASS_WEIGHT=balanced) "
            "or add images of the small classes")
