"""The end-to-end model: raw pixels -> augmentation -> the backbone's preprocessing -> backbone -> the cache's
pooling -> a copy of the dense head trained on the cache; and its compilation for phase 2: the optimizer
(Adam, AdamW, SGD), the rate schedule (cosine with warmup or constant), the loss (optionally
label-smoothed)."""

from __future__ import annotations

import math

import keras

from pipeline.backbones.extractor import pooling_layer
from pipeline.backbones.layers import InferenceMode, Preprocess
from pipeline.configs import OPTIMIZERS
from pipeline.data import augment
from pipeline.errors import PipelineError, choose


def augmentation(flip="horizontal", rotation=0.1, zoom=0.1, contrast=0.1, seed=0):
    """The augmentation layers (active only in training) as one Sequential, or None when all are off: the
    same layers cached views are drawn from (:func:`pipeline.data.augment.layers`)."""
    layers = augment.layers(flip, rotation, zoom, contrast, seed)
    return keras.Sequential(layers, name="augment") if layers else None


def build_model(spec, size, base, pooling, head_model, augment=None, gem_p=3.0):
    """Raw (N, size, size, 3) pixels in [0, 255] -> ``augment`` -> the backbone's preprocessing -> ``base``
    (always called with ``training=False``, see :class:`InferenceMode`) -> ``pooling`` (``gem_p``: GeM's exponent)
    -> a copy of ``head_model`` (features -> probabilities)
    with its trained weights: fine-tuning leaves the cached head as it was. Layer names are fixed, so a
    rebuilt model takes a backup's weights."""
    pool = pooling_layer(pooling, gem_p)
    inputs = keras.Input((size, size, 3), name="pixels")
    x = augment(inputs) if augment is not None else inputs
    x = Preprocess(spec.preprocess, name="preprocess")(x)
    x = InferenceMode(base, name="backbone")(x)  # training=False even inside fit (Dropout off)
    x = pool(x)
    head = keras.models.clone_model(head_model)
    head.set_weights(head_model.get_weights())
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_finetune")


SCHEDULES = ("cosine", "constant")
PROTECT_RATE = 0.25  # early stopping counts only epochs after the cosine rate has fallen to this share of its peak


def check_options(schedule="constant", warmup=0.0, weight_decay=0.0, label_smoothing=0.0):
    """One-line errors for phase 2's rate schedule, weight decay and label smoothing."""
    choose(schedule, dict.fromkeys(SCHEDULES), "schedule")
    for name, v, ok, text in (("WARMUP", warmup, 0 <= warmup < 1, "[0, 1)"),
                              ("WEIGHT_DECAY", weight_decay, 0 <= weight_decay < 1, "[0, 1)"),
                              ("LABEL_SMOOTHING", label_smoothing, 0 <= label_smoothing < 1, "[0, 1)")):
        if not ok:
            raise PipelineError(f"{name}={v}: must be in {text}")


def learning_rate_schedule(peak, schedule="constant", total_steps=0, warmup=0.0):
    """The rate of phase 2: ``peak`` throughout (constant), or (cosine) a linear warmup from 0 to ``peak`` over
    ``warmup`` of the ``total_steps``, then a cosine decay to 0 at the last step."""
    check_options(schedule, warmup)
    if schedule == "constant" or total_steps < 1:
        return peak
    warm = int(round(warmup * total_steps))
    if not warm:
        return keras.optimizers.schedules.CosineDecay(peak, total_steps)
    return keras.optimizers.schedules.CosineDecay(0.0, max(1, total_steps - warm), warmup_target=peak,
                                                  warmup_steps=warm)


def protected_epochs(epochs, steps_per_epoch, schedule="cosine", warmup=0.0) -> int:
    """How many first epochs early stopping never counts (Keras ``EarlyStopping(start_from_epoch=...)``): with
    the cosine schedule, every epoch up to the one by whose end the rate has passed its peak and fallen to
    PROTECT_RATE of it (three quarters of its decay done), so that a run never stops in its high-rate part;
    0 with a constant rate. The steps are counted as :func:`learning_rate_schedule` counts them."""
    if schedule != "cosine" or epochs < 1 or steps_per_epoch < 1:
        return 0
    total = epochs * steps_per_epoch
    warm = int(round(warmup * total))
    decay = max(1, total - warm)
    fraction = math.acos(2 * PROTECT_RATE - 1) / math.pi  # (1 + cos(pi f)) / 2 = PROTECT_RATE
    return min(epochs, math.ceil((warm + fraction * decay) / steps_per_epoch - 1e-9))


def make_optimizer(optimizer="adam", learning_rate=1e-5, momentum=0.9, weight_decay=0.0):
    """Adam (AdamW when ``weight_decay``: decoupled, biases excluded) or SGD with momentum (and decoupled
    decay). ``learning_rate``: a number or a schedule."""
    choose(optimizer, dict.fromkeys(OPTIMIZERS), "optimizer")
    if optimizer == "sgd":
        cls, kwargs = keras.optimizers.SGD, {"momentum": momentum}
    else:
        cls, kwargs = (keras.optimizers.AdamW if weight_decay else keras.optimizers.Adam), {}
    if weight_decay:
        kwargs["weight_decay"] = weight_decay
    opt_ = cls(learning_rate, **kwargs)
    if weight_decay:
        opt_.exclude_from_weight_decay(var_names=["bias"])
    return opt_


def loss_and_metric(binary, label_smoothing=0.0):
    """(loss, accuracy metric, whether labels must be one-hot): the dense head's loss, with ``label_smoothing``
    categorical cross-entropy on one-hot labels (Keras' sparse loss has no smoothing)."""
    if binary:
        return (keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing) if label_smoothing
                else "binary_crossentropy"), keras.metrics.BinaryAccuracy(name="accuracy"), False
    if label_smoothing:
        return (keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                keras.metrics.CategoricalAccuracy(name="accuracy"), True)
    return "sparse_categorical_crossentropy", keras.metrics.SparseCategoricalAccuracy(name="accuracy"), False


def compile_model(model, optimizer="adam", learning_rate=1e-5, momentum=0.9, *, schedule="constant", warmup=0.0,
                  total_steps=0, weight_decay=0.0, label_smoothing=0.0):
    """(Re)compile: Adam/AdamW or SGD with momentum (see :func:`make_optimizer`) at ``learning_rate``, the
    peak of ``schedule`` over ``total_steps`` (see :func:`learning_rate_schedule`); the loss and ``accuracy``
    metric of the dense head (with ``label_smoothing``, on one-hot labels: see :func:`loss_and_metric`)."""
    if not learning_rate > 0:
        raise PipelineError(f"FINETUNE_LR={learning_rate}: must be positive")
    check_options(schedule, warmup, weight_decay, label_smoothing)
    rate = learning_rate_schedule(learning_rate, schedule, total_steps, warmup)
    opt_ = make_optimizer(optimizer, rate, momentum, weight_decay)
    loss, metric, _ = loss_and_metric(model.output_shape[-1] == 1, label_smoothing)
    model.compile(optimizer=opt_, loss=loss, metrics=[metric])
    # the optimizer's variables now, not inside fit's first trace (which then traces twice: seconds lost)
    model.optimizer.build(model.trainable_variables)
    return model


def find_base(extractor_model):
    """The backbone model inside the extractor."""
    return next(layer for layer in extractor_model.layers if isinstance(layer, keras.Model))
