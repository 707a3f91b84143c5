"""Registry of frozen pretrained backbones, as data, and the headless model built from an entry.

Each entry pairs a keras.applications constructor with its own preprocessing mode, default and
minimum input size, pooled feature size and, where the family has one, ``alpha``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
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
        Backbone("mobilenet", "MobileNet", tf_, 224, 32, 1024, alpha=1.0,
                 blocks=r"^conv_(dw_|pw_)?\d+"),
        Backbone("mobilenet_v2", "MobileNetV2", tf_, 224, 32, 1280, alpha=1.0,
                 blocks=r"^(block_\d+|expanded_conv|Conv_1|Conv1)"),
        Backbone("mobilenet_v3_small", "MobileNetV3Small", inside, 224, 32, 576, alpha=1.0,
                 blocks=r"^(expanded_conv(_\d+)?|conv(_\d+)?)"),
        Backbone("mobilenet_v3_large", "MobileNetV3Large", inside, 224, 32, 960, alpha=1.0,
                 blocks=r"^(expanded_conv(_\d+)?|conv(_\d+)?)"),
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
POOLINGS = ("avg", "max", "flatten")


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


def build_base(spec: Backbone, size: int, weights: str, alpha: float | None = None, seed: int = 0,
               keras_home: str = ""):
    """The headless keras.applications model with its weights loaded (or seeded random ones); ImageNet
    weights come from ``keras_home`` (default: Keras' own cache folder, see :func:`records.use_keras_home`)."""
    import keras

    kwargs = {"include_top": False, "input_shape": (size, size, 3)}
    if spec.alpha is not None:
        kwargs["alpha"] = spec.alpha if alpha is None else alpha
    elif alpha is not None:
        raise PipelineError(f"ALPHA is not an option of {spec.name}; families with alpha: "
                            + ", ".join(n for n, b in BACKBONES.items() if b.alpha is not None))
    local_file = weights not in ("imagenet", "none")
    if local_file and not os.path.isfile(weights):
        raise PipelineError(f"WEIGHTS={weights}: no such file; use imagenet, none or a weights file path")
    keras.utils.set_random_seed(seed)  # weights=none must be the same random network every time
    if spec.constructor in LITE:
        from pipeline.backbones import lite

        return lite.EfficientNetLite(spec.constructor, weights=None if weights == "none" else weights,
                                     keras_home=keras_home, **kwargs)
    if spec.preprocess == "none" and spec.name.startswith(("mobilenet_v3", "efficientnet_v2", "convnext")):
        kwargs["include_preprocessing"] = True
    constructor = getattr(keras.applications, spec.constructor)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "Downloading data from ..." before an offline failure
            return constructor(weights=None if weights == "none" else weights, **kwargs)
    except Exception as e:  # keras raises a bare Exception when the download fails
        url = re.search(r"URL fetch failure on (\S+): ", str(e))
        if not url:
            if local_file:
                raise PipelineError(f"WEIGHTS={weights} does not fit {spec.name} "
                                    f"(size {size}, alpha {kwargs.get('alpha')}): {e}".splitlines()[0]) from None
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
                model = constructor(weights=None, **kwargs)
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
