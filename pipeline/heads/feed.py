"""The dense head's batches read from the cache file (:class:`Feed`, a ``keras.utils.PyDataset``) when the cache
is past MEMORY_BUDGET: one batch of rows in memory at a time."""

from __future__ import annotations

import keras
import numpy as np


class Feed(keras.utils.PyDataset):
    """(features float32, labels) batches of ``batch_size`` contiguous rows of ``X`` (lazy rows or an array),
    the batches in a fresh random order every epoch when ``seed`` is given (rows are shuffled a batch at a
    time: contiguous reads)."""

    def __init__(self, X, y, batch_size, seed=None):
        super().__init__()
        self.X, self.y, self.batch_size = X, np.asarray(y), int(batch_size)
        self.rng = None if seed is None else np.random.default_rng(seed)
        self.order = np.arange(len(self))
        self.on_epoch_end()

    def __len__(self):
        return -(-len(self.y) // self.batch_size)

    def __getitem__(self, i):
        a = int(self.order[i]) * self.batch_size
        return np.asarray(self.X[a:a + self.batch_size], np.float32), self.y[a:a + self.batch_size]

    def on_epoch_end(self):
        if self.rng is not None:
            self.order = self.rng.permutation(len(self))
