"""One frozen config dataclass per step; each field is a CLI option and a make variable.

``help`` metadata is the option's one-line help. Field ``foo_bar`` is ``--foo-bar`` and ``FOO_BAR=``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class FeaturesConfig:
    """Options of ``features``: which images, which frozen backbone, how to pool and store."""

    data: str = opt("digits", "class-folder tree (optionally train/val/test trees) or built-in: digits")
    backbone: str = opt("efficientnet_lite0", "backbone name (see `python -m pipeline backbones`)")
    weights: str = opt("imagenet", "imagenet (Keras cache / package), none (random), or a weights file")
    size: int = opt(0, "input size in pixels (0 = the backbone's default)")
    alpha: float = opt(0.0, "width multiplier for MobileNet families (0 = the family's default)")
    pooling: str = opt("avg", "avg | max | flatten")
    interpolation: str = opt("bilinear", "resize: nearest | bilinear | bicubic | lanczos | area")
    dtype: str = opt("float32", "stored feature dtype: float32 | float16")
    precision: str = opt("float32", "backbone compute: float32 | bfloat16 | float16 (Keras mixed precision; "
                                    "a win only on hardware with fast bfloat16/float16, see make bench)")
    fold_batchnorm: bool = opt(True, "fold frozen BatchNorm into the convolution before it (faster; "
                                     "features equal to float rounding, ~1e-5)")
    batch: int = opt(32, "images per backbone call")
    chunk: int = opt(256, "rows per HDF5 chunk and flush (rounded up to a multiple of BATCH)")
    val_fraction: float = opt(0.15, "share of each class for validation (folder trees without split dirs)")
    test_fraction: float = opt(0.15, "share of each class for testing")
    seed: int = opt(0, "seed of the split and of random (weights=none) backbones")
    per_class: int = opt(0, "use at most this many images per class (0 = all), for quick runs")
    max_pixels: int = opt(MAX_PIXELS, "skip images with more pixels than this")
    cache_dir: str = opt("cache", "where cache files are written")
    keras_home: str = opt("", "Keras cache folder (its models/ holds ImageNet weights); default $KERAS_HOME or ~/.keras")


def fields(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


def asdict(cfg) -> dict:
    return dataclasses.asdict(cfg)
