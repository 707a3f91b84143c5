"""Decoded pixels for the backbone: batches decoded ahead in threads while the backbone runs (:class:`Batches`,
for extraction) and a tf.data pipeline (:func:`dataset`, for training end to end).

Worker threads (one per core) decode the next batches into preallocated arrays, at most ``ahead`` batches
ahead. When the consumer needs a batch that is not ready it decodes the rest of it itself, so decoding never
waits for a worker. Pillow releases the GIL while it decodes and resizes, so threads run truly in parallel.

TensorFlow is imported lazily, in :func:`dataset` (training only): extraction may run on OpenVINO."""

from __future__ import annotations

import threading
from collections import deque

import joblib
import numpy as np


def cores() -> int:
    """Cores this process may use (affinity and container limits respected: joblib's count)."""

    return max(1, joblib.cpu_count())


class _Batch:
    """One batch being decoded: its items, its output array and who has claimed what."""

    def __init__(self, tag, items, shape):
        self.tag, self.items = tag, items
        self.out = np.empty((len(items), *shape), np.uint8)
        self.claimed = 0  # items [0, claimed) are taken by a worker or the consumer
        self.left = len(items)  # items not finished yet
        self.error = None
        self.done = threading.Event()
        if not items:
            self.done.set()


class Batches:
    """Iterator of ``(tag, pixels)`` for ``batches``, a sequence of ``(tag, items)``, in order: ``pixels`` is a
    uint8 array of ``load(item)`` for each item, each of ``shape``. Decoding runs up to ``ahead`` batches in
    front of the consumer in ``workers`` threads (default: one per core). An error from ``load`` is raised
    when its batch is reached. Use as a context manager (or call ``close``)."""

    def __init__(self, load, batches, shape, ahead=2, workers=None):
        self.load, self.shape = load, tuple(shape)
        self.todo = iter(batches)
        self.window = deque()  # batches being decoded, oldest first
        self.cond = threading.Condition()
        self.stopped = False
        for _ in range(max(1, ahead)):
            self._open_next()
        self.threads = [threading.Thread(target=self._work, name=f"decode-{k}", daemon=True)
                        for k in range(workers or cores())]
        for t in self.threads:
            t.start()

    def _open_next(self):
        nxt = next(self.todo, None)
        if nxt is not None:
            self.window.append(_Batch(nxt[0], list(nxt[1]), self.shape))

    def _claim(self, batches):
        """(batch, position) of the first unclaimed item among ``batches``, or None; call with the lock held."""
        for b in batches:
            if b.claimed < len(b.items):
                b.claimed += 1
                return b, b.claimed - 1
        return None

    def _decode(self, b, j):
        try:
            if b.error is None:
                b.out[j] = self.load(b.items[j])
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            b.error = b.error or e
        with self.cond:
            b.left -= 1
            if b.left == 0:
                b.done.set()

    def _work(self):
        while True:
            with self.cond:
                task = self._claim(self.window)
                while task is None and not self.stopped:
                    self.cond.wait()
                    task = self._claim(self.window)
                if self.stopped:
                    return
            self._decode(*task)

    def __iter__(self):
        return self

    def __next__(self):
        with self.cond:
            if not self.window:
                raise StopIteration
            b = self.window[0]
        while True:  # what no worker has started yet, the consumer decodes itself
            with self.cond:
                task = self._claim([b])
            if task is None:
                break
            self._decode(*task)
        b.done.wait()
        with self.cond:
            self.window.popleft()
            self._open_next()
            self.cond.notify_all()
        if b.error is not None:
            raise b.error
        return b.tag, b.out

    def close(self):
        """Stop the workers (they finish the image in hand) and wait for them."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for t in self.threads:
            t.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dataset(ds, indices, size, interpolation="bilinear", batch=32, labels=False, shuffle_seed=None):
    """A tf.data pipeline of uint8 (N, size, size, 3) pixel batches of ``ds`` items ``indices`` (with int32
    labels when ``labels``), in order unless ``shuffle_seed`` is given (then reshuffled every epoch).
    Decoding runs in parallel with the consumer."""
    import tensorflow as tf

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
