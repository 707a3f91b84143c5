"""Registry of frozen pretrained backbones, as data, and the headless model built from an entry.

Each entry pairs a keras.applications constructor with its own preprocessing mode, default and
minimum input size, pooled feature size and, where the family has one, ``alpha``. Keras is imported lazily,
by :func:`build_base`: listing and resolving backbones (``python -m pipeline backbones``, a current cache) imports
no TensorFlow.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import warnings
from dataclasses import dataclass

from pipeline import records
from pipeline.errors import PipelineError, choose


@dataclass(frozen=True)
class Backbone:
    """One registry entry. ``preprocess`` is a mode of :class:`Preprocess`."""

    name: str
    constructor: str  # attribute of keras.applications, or an EfficientNet-Lite member: "lite0", "lite1", "lite2"
    preprocess: str  # caffe | tf | torch | lite0 ((x - 127) / 128, every Lite member's) | none (inside the model)
    default_size: int
    min_size: int
    features: int  # channels of the last feature map == pooled feature size
    alpha: float | None = None  # default alpha, for families that have one
    imagenet_alphas: tuple = ()  # the alphas Keras has ImageNet weights for
    min_alpha: float = 0.0  # below it a layer of the family would have no channels
    blocks: str = r"^(block\d+|conv\d+|mixed\d+|stage\d+|stem|top)"  # unfreeze-by-name prefixes


def _entries():
    caffe, tf_, torch_, inside = "caffe", "tf", "torch", "none"
    return [
        Backbone("vgg16", "VGG16", caffe, 224, 32, 512, blocks=r"^block\d+"),
        Backbone("vgg19", "VGG19", caffe, 224, 32, 512, blocks=r"^block\d+"),
        Backbone("resnet50", "ResNet50", caffe, 224, 32, 2048, blocks=r"^conv\d+_block\d+|^conv\d+"),
        Backbone("resnet101", "ResNet101", caffe, 224, 32, 2048, blocks=r"^conv\d+_block\d+|^conv\d+"),
        Backbone("resnet152", "ResNet152", caffe, 224, 32, 2048, blocks=r"^conv\d+_block\d+|^conv\d+"),
        Backbone("resnet50_v2", "ResNet50V2", tf_, 224, 32, 2048, blocks=r"^conv\d+_block\d+|^conv\d+"),
        Backbone("resnet101_v2", "ResNet101V2", tf_, 224, 32, 2048, blocks=r"^conv\d+_block\d+|^conv\d+"),
        Backbone("resnet152_v2", "ResNet152V2", tf_, 224, 32, 2048, blocks=r"^conv\d+_block\d+|^conv\d+"),
        Backbone("xception", "Xception", tf_, 299, 71, 2048, blocks=r"^block\d+"),
        Backbone("inception_v3", "InceptionV3", tf_, 299, 75, 2048, blocks=r"^mixed\d+"),
        Backbone("inception_resnet_v2", "InceptionResNetV2", tf_, 299, 75, 1536,
                 blocks=r"^(block35_\d+|block17_\d+|block8_\d+|mixed_\w+|conv_7b)"),
        Backbone("mobilenet", "MobileNet", tf_, 224, 32, 1024, alpha=1.0, imagenet_alphas=(0.25, 0.5, 0.75, 1.0),
                 min_alpha=1 / 32, blocks=r"^conv_(dw_|pw_)?\d+"),  # its first layer has 32 * alpha channels
        Backbone("mobilenet_v2", "MobileNetV2", tf_, 224, 32, 1280, alpha=1.0,
                 imagenet_alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4), blocks=r"^(block_\d+|expanded_conv|Conv_1|Conv1)"),
        Backbone("mobilenet_v3_small", "MobileNetV3Small", inside, 224, 32, 576, alpha=1.0,
                 imagenet_alphas=(0.75, 1.0), blocks=r"^(expanded_conv(_\d+)?|conv(_\d+)?)"),
        Backbone("mobilenet_v3_large", "MobileNetV3Large", inside, 224, 32, 960, alpha=1.0,
                 imagenet_alphas=(0.75, 1.0), blocks=r"^(expanded_conv(_\d+)?|conv(_\d+)?)"),
        Backbone("efficientnet_b0", "EfficientNetB0", inside, 224, 32, 1280, blocks=r"^(block\d+[a-z]?|stem|top)"),
        Backbone("efficientnet_b1", "EfficientNetB1", inside, 240, 32, 1280, blocks=r"^(block\d+[a-z]?|stem|top)"),
        Backbone("efficientnet_b2", "EfficientNetB2", inside, 260, 32, 1408, blocks=r"^(block\d+[a-z]?|stem|top)"),
        Backbone("efficientnet_b3", "EfficientNetB3", inside, 300, 32, 1536, blocks=r"^(block\d+[a-z]?|stem|top)"),
        Backbone("efficientnet_v2_b0", "EfficientNetV2B0", inside, 224, 32, 1280,
                 blocks=r"^(block\d+[a-z]?|stem|top)"),
        Backbone("densenet121", "DenseNet121", torch_, 224, 32, 1024, blocks=r"^(conv\d+_block\d+|conv\d+|pool\d+)"),
        Backbone("convnext_tiny", "ConvNeXtTiny", inside, 224, 32, 768,
                 blocks=r"^convnext_tiny_(stage_\d+|downsampling_block_\d+|stem)"),
        Backbone("efficientnet_lite0", "lite0", "lite0", 224, 32, 1280, blocks=r"^(block\d+[a-z]?|stem|top)"),
        Backbone("efficientnet_lite1", "lite1", "lite0", 240, 32, 1280, blocks=r"^(block\d+[a-z]?|stem|top)"),
        Backbone("efficientnet_lite2", "lite2", "lite0", 260, 32, 1280, blocks=r"^(block\d+[a-z]?|stem|top)"),
    ]


LITE = ("lite0", "lite1", "lite2")  # constructors built by pipeline.backbones.lite, not keras.applications
BACKBONES = {b.name: b for b in _entries()}
POOLINGS = ("avg", "max", "flatten", "gem")  # gem: generalised mean, GEM_P


def get(name: str) -> Backbone:
    """The registry entry for ``name``; unknown names fail listing the valid ones."""
    return choose(name, BACKBONES, "backbone")


def resolve_size(spec: Backbone, size: int | None) -> int:
    """The input size to use: the default when unset; below the family's minimum is an error."""
    size = int(size or spec.default_size)
    if size < spec.min_size:
        raise PipelineError(
            f"SIZE={size} is below {spec.name}'s minimum input size {spec.min_size}; "
            f"use SIZE>={spec.min_size} (small images are upsampled)")
    return size


def _alphas(values) -> str:
    return ", ".join(str(a) for a in values)


def check_options(spec: Backbone, size: int | None, weights: str, alpha: float | None = None) -> int:
    """The input size to use, after checking SIZE, ALPHA and WEIGHTS against the registry before any work:
    ALPHA only for families with it, finite and above 0 (and the family's minimum), one Keras has ImageNet
    weights for with WEIGHTS=imagenet; WEIGHTS imagenet, none or an existing file. Any other is one line."""
    size = resolve_size(spec, size)
    if alpha is not None:
        if spec.alpha is None:
            raise PipelineError(f"ALPHA is not an option of {spec.name}; families with alpha: "
                                + ", ".join(n for n, b in BACKBONES.items() if b.alpha is not None))
        if not (math.isfinite(alpha) and alpha > 0):
            raise PipelineError(f"ALPHA={alpha:g}: the width multiplier must be above 0 "
                                f"(0 = {spec.name}'s default, {spec.alpha})")
        if alpha < spec.min_alpha:
            raise PipelineError(f"ALPHA={alpha:g}: too narrow for {spec.name} (a layer would have no channels); "
                                f"use ALPHA>={spec.min_alpha:g}")
        if weights == "imagenet" and spec.imagenet_alphas and alpha not in spec.imagenet_alphas:
            raise PipelineError(f"ALPHA={alpha:g}: {spec.name} has ImageNet weights for ALPHA="
                                f"{_alphas(spec.imagenet_alphas)} only; use one of them, or WEIGHTS=none or a "
                                f"weights file made for ALPHA={alpha:g}")
    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
        raise PipelineError(f"WEIGHTS={weights}: no such file; use imagenet, none or a weights file path")
    return size


def valid_values(spec: Backbone, weights: str) -> str:
    """The option values ``spec`` accepts, in words."""
    out = [f"SIZE>={spec.min_size}"]
    if spec.alpha is not None:
        out.append(f"ALPHA={_alphas(spec.imagenet_alphas)}" if weights == "imagenet" and spec.imagenet_alphas
                   else f"ALPHA>={spec.min_alpha:g}" if spec.min_alpha else "ALPHA>0")
    return ", ".join(out) + "; WEIGHTS=imagenet, none or a weights file"


NOISE = (  # Keras' warnings that say nothing to act on: dropped
    r"`input_shape` is undefined or non-square",  # ImageNet weights of another size: the same weights (see below)
)


def _construct(constructor, weights: str, kwargs: dict):
    """``constructor(weights=..., **kwargs)`` with its printing and warnings held: when it fails they are
    dropped (its error says what matters), when it builds its warnings are re-emitted, less :data:`NOISE`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.redirect_stdout(io.StringIO()):  # "Downloading data from ..." before an offline failure
            model = constructor(weights=None if weights == "none" else weights, **kwargs)
    for w in caught:
        if not any(re.search(p, str(w.message)) for p in NOISE):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return model


def build_base(spec: Backbone, size: int, weights: str, alpha: float | None = None, seed: int = 0,
               keras_home: str = ""):
    """The headless keras.applications model with its weights loaded (or seeded random ones); ImageNet
    weights come from ``keras_home`` (default: Keras' own cache folder, see :func:`records.use_keras_home`).
    Option values are checked first (:func:`check_options`); one Keras still refuses is one line too."""
    import keras

    size = check_options(spec, size, weights, alpha)
    kwargs = {"include_top": False, "input_shape": (size, size, 3)}
    if spec.alpha is not None:
        kwargs["alpha"] = spec.alpha if alpha is None else alpha
    local_file = weights not in ("imagenet", "none")
    keras.utils.set_random_seed(seed)  # weights=none must be the same random network every time
    if spec.constructor in LITE:
        from pipeline.backbones import lite

        return lite.EfficientNetLite(spec.constructor, weights=None if weights == "none" else weights,
                                     keras_home=keras_home, **kwargs)
    if spec.preprocess == "none" and spec.name.startswith(("mobilenet_v3", "efficientnet_v2", "convnext")):
        kwargs["include_preprocessing"] = True
    constructor = getattr(keras.applications, spec.constructor)
    try:
        return _construct(constructor, weights, kwargs)
    except Exception as e:  # keras raises a bare Exception when the download fails
        url = re.search(r"URL fetch failure on (\S+): ", str(e))
        if not url:
            shown = f"SIZE={size}" + (f", ALPHA={kwargs['alpha']:g}" if "alpha" in kwargs else "")
            said = str(e).splitlines()[0].split(" Example error message")[0]  # weights: "N objects could not..."
            if local_file:
                raise PipelineError(f"WEIGHTS={weights} does not fit {spec.name} with {shown} (Keras: "
                                    f"{said}); give the BACKBONE, ALPHA and SIZE the file was "
                                    "made for") from None
            if isinstance(e, ValueError):  # Keras refusing an option value that check_options let through
                raise PipelineError(f"{spec.name} refuses {shown}, WEIGHTS={weights} (Keras: {said}); "
                                    f"valid: {valid_values(spec, weights)}") from None
            raise
        fname = url.group(1).rsplit("/", 1)[-1]
        if size != spec.default_size:
            # MobileNet's ImageNet files are per input size, but its weights are not: as Keras does for
            # sizes it has no file for, load the default size's (cached) file into the requested size.
            try:
                ref = build_base(spec, spec.default_size, weights, alpha=alpha, seed=seed, keras_home=keras_home)
            except PipelineError:
                pass
            else:
                keras.utils.set_random_seed(seed)
                model = _construct(constructor, "none", kwargs)
                model.set_weights(ref.get_weights())
                warnings.warn(f"{fname} is not cached: using the {spec.default_size}x{spec.default_size} "
                              f"ImageNet weights of {spec.name} at size {size}", stacklevel=2)
                return model
        raise PipelineError(
            f"{spec.name} ImageNet weights are not in the Keras cache and this machine is offline: "
            f"put {fname} into {os.path.join(records.keras_home(keras_home), 'models')}/ (from {url.group(1)}), "
            f"set KERAS_HOME to a folder whose models/ has it, or pass WEIGHTS=/path/to/file") from None


def weights_digest(model) -> str:
    """sha256 over every weight array: identifies exactly what the network computes."""
    h = hashlib.sha256()
    for w in model.weights:
        h.update(w.path.encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()
