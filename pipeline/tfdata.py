"""tf.data pipelines over a :class:`pipeline.data.Dataset`: parallel decode + resize, batched, prefetched."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def images(ds, indices, size, interpolation="bilinear", batch=32, labels=False, shuffle_seed=None):
    """Batches of uint8 (N, size, size, 3) pixels (and int32 labels when ``labels``), in order unless
    ``shuffle_seed`` is given (then reshuffled every epoch). Decoding runs in parallel with the consumer."""
    indices = np.asarray(indices, dtype=np.int64)
    targets = np.asarray([ds.items[i].label for i in indices], dtype=np.int32)
    pipe = tf.data.Dataset.from_tensor_slices((indices, targets))
    if shuffle_seed is not None:
        pipe = pipe.shuffle(len(indices), seed=shuffle_seed, reshuffle_each_iteration=True)

    def decode(i, y):
        x = tf.numpy_function(lambda j: ds.load(int(j), size, interpolation), [i], tf.uint8, stateful=False)
        x.set_shape((size, size, 3))
        return (x, y) if labels else x

    pipe = pipe.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return pipe.batch(batch).prefetch(tf.data.AUTOTUNE)
