"""The end-to-end model: raw pixels -> augmentation -> the backbone's preprocessing -> backbone -> the cache's
pooling -> a copy of the dense head trained on the cache; and its compilation for phase 2."""

from __future__ import annotations

from pipeline.configs import FLIPS, OPTIMIZERS
from pipeline.errors import PipelineError, choose


def augmentation(flip="horizontal", rotation=0.1, zoom=0.1, contrast=0.1, seed=0):
    """The augmentation layers (active only in training), or None when all are off."""
    import keras

    choose(flip, dict.fromkeys(FLIPS), "flip mode")
    for name, v, top in (("ROTATION", rotation, 0.5), ("ZOOM", zoom, 1.0), ("CONTRAST", contrast, 1.0)):
        if not 0 <= v < top:
            raise PipelineError(f"{name}={v}: must be in [0, {top})")
    layers = []
    if flip != "none":
        layers.append(keras.layers.RandomFlip(flip, seed=seed, name="augment_flip"))
    if rotation:
        layers.append(keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=seed + 1,
                                                  name="augment_rotation"))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, fill_mode="reflect", seed=seed + 2, name="augment_zoom"))
    if contrast:
        layers.append(keras.layers.RandomContrast(contrast, seed=seed + 3, name="augment_contrast"))
    return keras.Sequential(layers, name="augment") if layers else None


def build_model(spec, size, base, pooling, head_model, augment=None):
    """Raw (N, size, size, 3) pixels in [0, 255] -> ``augment`` -> the backbone's preprocessing -> ``base``
    (always called with ``training=False``, see :class:`InferenceMode`) -> ``pooling`` -> a copy of ``head_model`` (features -> probabilities)
    with its trained weights: fine-tuning leaves the cached head as it was. Layer names are fixed, so a
    rebuilt model takes a backup's weights."""
    import keras

    from pipeline.backbones.extractor import POOLING_LAYERS
    from pipeline.backbones.layers import InferenceMode, Preprocess

    pool = choose(pooling, POOLING_LAYERS, "pooling")
    inputs = keras.Input((size, size, 3), name="pixels")
    x = augment(inputs) if augment is not None else inputs
    x = Preprocess(spec.preprocess, name="preprocess")(x)
    x = InferenceMode(base, name="backbone")(x)  # training=False even inside fit (Dropout off)
    x = pool(name=f"{pooling}_pool")(x)
    head = keras.models.clone_model(head_model)
    head.set_weights(head_model.get_weights())
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_finetune")


def compile_model(model, optimizer="adam", learning_rate=1e-5, momentum=0.9):
    """(Re)compile: Adam or SGD with momentum; the loss and ``accuracy`` metric of the dense head."""
    import keras

    choose(optimizer, dict.fromkeys(OPTIMIZERS), "optimizer")
    if not learning_rate > 0:
        raise PipelineError(f"FINETUNE_LR={learning_rate}: must be positive")
    opt_ = (keras.optimizers.Adam(learning_rate) if optimizer == "adam"
            else keras.optimizers.SGD(learning_rate, momentum=momentum))
    binary = model.output_shape[-1] == 1
    model.compile(optimizer=opt_, loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy") if binary
                           else keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    # the optimizer's variables now, not inside fit's first trace (which then traces twice: seconds lost)
    model.optimizer.build(model.trainable_variables)
    return model


def find_base(extractor_model):
    """The backbone model inside the extractor."""
    import keras

    return next(layer for layer in extractor_model.layers if isinstance(layer, keras.Model))
