"""Augmentation: the Keras layers ``make finetune`` trains with (FLIP, ROTATION, ZOOM, CONTRAST), and the
same layers drawn deterministically per image for cached views: view j of an image comes from a seed
derived from (its content hash, j, SEED), whatever the batch, the order or the other images.
Keras and TensorFlow are imported lazily, in the functions that draw: checking the options (a head on a
cache with views) must not load them."""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline import keras_internals
from pipeline.configs import FLIPS
from pipeline.errors import PipelineError, choose


def check(flip, rotation, zoom, contrast) -> None:
    choose(flip, dict.fromkeys(FLIPS), "flip mode")
    for name, v, top in (("ROTATION", rotation, 0.5), ("ZOOM", zoom, 1.0), ("CONTRAST", contrast, 1.0)):
        if not 0 <= v < top:
            raise PipelineError(f"{name}={v}: must be in [0, {top})")


def layers(flip="horizontal", rotation=0.1, zoom=0.1, contrast=0.1, seed=0) -> list:
    """The augmentation layers in order (active only in training); empty when all are off."""
    import keras

    check(flip, rotation, zoom, contrast)
    out = []
    if flip != "none":
        out.append(keras.layers.RandomFlip(flip, seed=seed, name="augment_flip"))
    if rotation:
        out.append(keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=seed + 1, name="augment_rotation"))
    if zoom:
        out.append(keras.layers.RandomZoom(zoom, fill_mode="reflect", seed=seed + 2, name="augment_zoom"))
    if contrast:
        out.append(keras.layers.RandomContrast(contrast, seed=seed + 3, name="augment_contrast"))
    return out


def view_seed(sha256: str, view: int, seed: int, layer: int) -> int:
    """The seed of one layer's draw for view ``view`` of the image with content hash ``sha256``."""
    return int(hashlib.sha256(f"{sha256}:{view}:{seed}:{layer}".encode()).hexdigest()[:8], 16)


class Views:
    """``batch(pixels, keys)``: the views of a batch of images (uint8 (N, H, W, 3) -> uint8), ``keys`` one
    (content sha256, view j) per image. Each image's transformation is drawn alone from :func:`view_seed`
    (Keras' stateless draws: the same seed, the same view), then the batch is transformed at once."""

    def __init__(self, flip="horizontal", rotation=0.1, zoom=0.1, contrast=0.1, seed=0):
        self.layers, self.seed = layers(flip, rotation, zoom, contrast, seed), seed
        self._compiled = {}

    def _draws(self, shape, keys) -> list:
        """Every layer's transformation of a batch of ``shape``: each image's drawn with its own seed, in
        one compiled call per batch shape (the draws Keras makes with an integer seed, without their eager
        cost)."""
        seed = keras_internals.int_seed
        seeds = np.asarray([[np.asarray(seed(view_seed(sha, j, self.seed, k))) for sha, j in keys]
                            for k in range(len(self.layers))])
        fn = self._compiled.get(shape)
        if fn is None:
            fn = self._compiled[shape] = _compiled_draws(self.layers, shape)
        return fn(seeds)

    def batch(self, pixels: np.ndarray, keys) -> np.ndarray:
        import keras

        x = keras.ops.convert_to_tensor(np.asarray(pixels, np.float32))
        if self.layers:
            for layer, draw in zip(self.layers, self._draws(tuple(x.shape), keys)):
                x = layer.transform_images(x, draw, training=True)
        return np.clip(np.rint(keras.ops.convert_to_numpy(x)), 0, 255).astype(np.uint8)

    def view(self, pixels: np.ndarray, sha256: str, j: int) -> np.ndarray:
        """View j of one image (uint8 (H, W, 3))."""
        return self.batch(pixels[None], [(sha256, j)])[0]


def _compiled_draws(layers, shape):
    """A tf.function of (layers, N, 2) seeds: each layer's random transformation of each image of a batch
    of ``shape`` drawn with that image's seed, stacked per layer as :func:`_stack` does."""
    import keras
    import tensorflow as tf

    def one_layer(layer, seeds):
        one = keras.ops.zeros((1, *shape[1:]), "float32")
        fixed = keras_internals.fixed_seed_generator  # every draw of the call with this image's seed
        draws = [layer.get_random_transformation(one, training=True, seed=fixed(seeds[i])) for i in range(shape[0])]
        if isinstance(draws[0], dict):
            return {name: _stack([d[name] for d in draws], name, shape) for name in draws[0]}
        return _stack(draws, "", shape)

    @tf.function(autograph=False)
    def draws(seeds):
        return [one_layer(layer, seeds[k]) for k, layer in enumerate(layers)]

    return draws


def _stack(values, name, shape):
    """Per-image draws as one batch's: tensors (a leading dimension of 1) concatenated; the batch's own size
    and shape where a draw names them; other plain values (image height, width) as they are."""
    import keras

    v = values[0]
    if name == "batch_size":
        return shape[0]
    if name == "input_shape":
        return tuple(shape)
    if v is None or isinstance(v, (bool, int, float, tuple, str)) or keras.ops.ndim(v) == 0:
        return v
    return keras.ops.concatenate(values, axis=0)
