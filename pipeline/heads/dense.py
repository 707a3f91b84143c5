"""The Keras dense head on pooled features, as a scikit-learn classifier (:class:`DenseHead`), and the pieces
the fine-tune step reuses to put exactly this head on the backbone.
Keras and TensorFlow are imported lazily, when a dense head fits or predicts: the registry makes one
without loading them."""

from __future__ import annotations

import sys

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline import quiet
from pipeline.cache import lazy
from pipeline.errors import PipelineError
from pipeline.heads.params import ints

INPUT_NAME, OUTPUT_NAME = "features", "head_output"


def build_model(dim, n_classes, hidden=(), dropout=0.2, name="dense_head"):
    """Pooled feature vector (dim,) -> [Dropout -> Dense(relu)]* -> Dropout -> class probabilities.

    Two classes give one sigmoid unit (as in the Keras guide's cats-vs-dogs), more give a softmax. Layer
    names are stable (``head_dense_1``.., ``head_dropout_1``.., ``head_output``) so the fine-tune step can
    put this very model on top of the backbone. Seed Keras before calling for reproducible weights.
    """
    import keras

    inputs = keras.Input((dim,), name=INPUT_NAME)
    x = inputs
    for i, units in enumerate(hidden, 1):
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"head_dropout_{i}")(x)
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense_{i}")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"head_dropout_{len(hidden) + 1}")(x)
    binary = n_classes == 2
    outputs = keras.layers.Dense(1 if binary else n_classes, activation="sigmoid" if binary else "softmax",
                                 name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=name)


def compile_model(model, learning_rate=1e-3):
    """Adam, cross-entropy matching the output (binary for one sigmoid unit), accuracy as ``accuracy``.
    Steps run 32 to a compiled call: on cached features Keras' per-step overhead is most of an epoch, and
    the updates are exactly the same."""
    import keras

    binary = model.output_shape[-1] == 1
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy") if binary
                 else keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        steps_per_execution=32)
    return model


def batches(X, y, batch_size, shuffle_seed=None, choices=None):
    """A tf.data pipeline of (features, label) batches, reshuffled every epoch when ``shuffle_seed`` is given.
    Half the per-epoch time of handing ``fit`` NumPy arrays, which on cached features is most of an epoch.
    ``choices``: X is (N, V, D), V rows per image (its clean row and its augmented views); each epoch draws
    one of them per image."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((X, y))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(X), seed=shuffle_seed, reshuffle_each_iteration=True)
    if choices:
        ds = ds.map(lambda x, t: (x[tf.random.uniform((), 0, choices, dtype=tf.int32, seed=shuffle_seed)], t))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def stack_views(X, views_X, views_image):
    """(N, 1 + K, D): each image's clean row then its K views (rows of ``views_X`` whose ``views_image`` is
    that image, in view order)."""
    k = len(views_image) // max(len(X), 1)
    out = np.empty((len(X), 1 + k, X.shape[1]), np.float32)
    out[:, 0] = X
    order = np.argsort(views_image, kind="stable")
    out[:, 1:] = np.asarray(views_X, np.float32)[order].reshape(len(X), k, X.shape[1])
    return out


def early_stopping(patience, monitor="val_loss"):
    import keras

    return keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True)


def fit_verbose(verbose: int, stream=None) -> int:
    """Keras' ``fit(verbose=)`` for a wish of ``verbose``: its progress bars (1) only when ``stream`` (stdout) is
    a terminal, else one line per epoch (2), which a log file keeps readable; 0 and 2 as they are."""
    stream = sys.stdout if stream is None else stream
    return 2 if verbose == 1 and not (stream is not None and stream.isatty()) else verbose


def keras_class_weight(class_weight, y_encoded, n_classes):
    """Keras' ``class_weight`` dict from ``"balanced"`` (scikit-learn's formula) or None."""
    if class_weight is None:
        return None
    from sklearn.utils.class_weight import compute_class_weight

    if class_weight != "balanced":
        raise PipelineError(f"CLASS_WEIGHT={class_weight!r}: expected balanced | none")
    w = compute_class_weight("balanced", classes=np.arange(n_classes), y=y_encoded)
    return {i: float(v) for i, v in enumerate(w)}


class DenseHead(ClassifierMixin, BaseEstimator):
    """A Keras dense head as a scikit-learn classifier (``get_params``/``clone``/GridSearchCV work).

    ``fit(X, y, validation_data=(Xv, yv))`` early-stops on the validation loss and restores the best
    weights; without ``validation_data`` it holds out ``validation_fraction`` of X (stratified), or, at 0,
    watches the training loss. Learned: ``classes_``, ``model_`` (features -> probabilities), ``history_``.
    The same ``seed`` gives the same predictions.
    """

    def __init__(self, hidden=(), dropout=0.2, learning_rate=1e-3, epochs=100, batch_size=32, patience=5,
                 class_weight=None, validation_fraction=0.15, shuffle=True, seed=0, verbose=0):
        self.hidden = hidden
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.class_weight = class_weight
        self.validation_fraction = validation_fraction
        self.shuffle = shuffle
        self.seed = seed
        self.verbose = verbose

    def _encode(self, y):
        idx = np.searchsorted(self.classes_, y)
        idx = np.clip(idx, 0, len(self.classes_) - 1)
        if not np.array_equal(self.classes_[idx], y):
            unknown = sorted(set(np.asarray(y).tolist()) - set(self.classes_.tolist()))
            raise ValueError(f"labels {unknown} were not seen in training")
        return idx.astype(np.int32)

    def fit(self, X, y, validation_data=None, views=None):
        """``views``: (features, image) of augmented views of the rows of X (``image`` indexes X); each epoch
        then trains on one row per image drawn among its clean row and its views."""
        quiet.tensorflow()
        import keras

        if isinstance(X, lazy.Rows):  # past MEMORY_BUDGET: batches read from the file
            return self._fit_rows(X, y, validation_data)
        X, y = validate_data(self, X, y, dtype=np.float32)
        stacked = stack_views(X, *views) if views is not None and len(views[1]) else None
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError("DenseHead needs at least two classes")
        yi = self._encode(y)
        monitor = "val_loss"
        if validation_data is not None:
            Xv = validate_data(self, validation_data[0], dtype=np.float32, reset=False)
            val = (Xv, self._encode(np.asarray(validation_data[1])))
        elif self.validation_fraction:
            from sklearn.model_selection import train_test_split

            rows = np.arange(len(X))
            fit_rows, val_rows = train_test_split(rows, test_size=self.validation_fraction, stratify=yi,
                                                  random_state=self.seed)
            val = (X[val_rows], yi[val_rows])
            X, yi = X[fit_rows], yi[fit_rows]
            stacked = stacked[fit_rows] if stacked is not None else None
        else:
            val, monitor = None, "loss"
        keras.utils.set_random_seed(self.seed)
        model = build_model(X.shape[1], len(self.classes_), ints(self.hidden), self.dropout)
        compile_model(model, self.learning_rate)
        train = (batches(X, yi, self.batch_size, self.seed if self.shuffle else None) if stacked is None else
                 batches(stacked, yi, self.batch_size, self.seed, choices=stacked.shape[1]))
        hist = model.fit(train,
                         epochs=self.epochs, verbose=fit_verbose(self.verbose), shuffle=False,  # the pipeline shuffles
                         validation_data=None if val is None else batches(*val, self.batch_size),
                         class_weight=keras_class_weight(self.class_weight, yi, len(self.classes_)),
                         callbacks=[early_stopping(self.patience, monitor)])
        self.model_ = model
        self.history_ = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
        return self

    def _fit_rows(self, X, y, validation_data):
        """:meth:`fit` on lazy rows (no views, no held-out share: the val split is given), through :class:`Feed`."""
        import keras

        from pipeline.heads.feed import Feed

        y = np.asarray(y)
        check_classification_targets(y)
        self.classes_, self.n_features_in_ = np.unique(y), X.shape[1]
        if len(self.classes_) < 2 or validation_data is None:
            raise ValueError("DenseHead on lazy rows needs at least two classes and validation_data")
        yi = self._encode(y)
        keras.utils.set_random_seed(self.seed)
        model = compile_model(build_model(X.shape[1], len(self.classes_), ints(self.hidden), self.dropout),
                              self.learning_rate)
        val = Feed(validation_data[0], self._encode(np.asarray(validation_data[1])), 4096)
        hist = model.fit(Feed(X, yi, self.batch_size, self.seed if self.shuffle else None), epochs=self.epochs,
                         verbose=fit_verbose(self.verbose), validation_data=val,
                         class_weight=keras_class_weight(self.class_weight, yi, len(self.classes_)),
                         callbacks=[early_stopping(self.patience)])
        self.model_ = model
        self.history_ = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        if not isinstance(X, lazy.Rows):
            X = validate_data(self, X, dtype=np.float32, reset=False)
        import keras

        # direct calls in large batches: no per-call tf.function retracing (unlike model.predict in a loop)
        p = np.concatenate([keras.ops.convert_to_numpy(self.model_(np.asarray(X[i:i + 4096], np.float32),
                                                                   training=False))
                            for i in range(0, len(X), 4096)] or [np.zeros((0, self.model_.output_shape[-1]))])
        p = p.astype(np.float64)
        if p.shape[1] == 1:
            p = np.hstack([1.0 - p, p])
        return p

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
