"""The registry of heads, as data: each one is trained on cached pooled features.

An entry holds a factory ``make(seed) -> estimator`` (a scikit-learn Pipeline, with standardisation where
it helps, or a :class:`DenseHead`), its hyper-parameters with types and defaults (each one names the
estimator parameter it sets, so ``HIDDEN=1024,512`` or ``C=0.1`` reach the right place), the grid of its
main regularisation for the sweep, and whether it takes class weights.

Parameter names never repeat an option of the ``head`` step (``ALPHA``, ``WEIGHTS`` and ``SEED`` select
the cache), hence ``L2`` for the MLP's alpha and ``VOTE`` for k-NN's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.errors import PipelineError, choose


# --- hyper-parameter types: text from the CLI -> value --------------------------------------------------

def _ints(text):
    """``"1024,512"`` -> (1024, 512); ``""``, ``"0"`` and ``"none"`` -> () (no hidden layer)."""
    if isinstance(text, (tuple, list)):
        return tuple(int(t) for t in text)
    text = str(text).strip().lower()
    if text in ("", "0", "none", "()"):
        return ()
    out = tuple(int(t) for t in text.replace(" ", "").strip("()").split(",") if t)
    if any(n < 1 for n in out):
        raise ValueError(text)
    return out


def _class_weight(text):
    """``balanced`` or ``none``."""
    if text is None:
        return None
    text = str(text).strip().lower()
    if text in ("none", "", "0", "false"):
        return None
    if text == "balanced":
        return "balanced"
    raise ValueError(text)


def _optional_int(text):
    if text is None or str(text).strip().lower() in ("none", "", "0"):
        return None
    return int(text)


def _bool(text):
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


TYPES = {"float": float, "int": int, "ints": _ints, "class_weight": _class_weight,
         "optional_int": _optional_int, "bool": _bool, "str": str}
TYPE_HELP = {"ints": "comma list of ints, e.g. 1024,512 (none = no layer)", "class_weight": "balanced | none",
             "optional_int": "int or none", "bool": "0 | 1"}


@dataclass(frozen=True)
class Param:
    default: object
    kind: str  # a key of TYPES
    target: str  # the estimator parameter it sets (``clf__C``, or DenseHead's own name)
    help: str = ""

    def parse(self, name, text):
        try:
            return TYPES[self.kind](text)
        except (TypeError, ValueError):
            want = TYPE_HELP.get(self.kind, self.kind)
            raise PipelineError(f"{name.upper()}={text!r}: expected {want}") from None


@dataclass(frozen=True)
class Head:
    """One registry entry."""

    name: str
    kind: str  # "sklearn" | "keras"
    make: callable  # make(seed) -> unfitted estimator with the defaults
    params: dict = field(default_factory=dict)  # name -> Param
    grid: dict = field(default_factory=dict)  # param name -> values tried by the sweep
    class_weights: bool = False
    help: str = ""

    def resolve(self, overrides: dict | None = None) -> dict:
        """Defaults updated with ``overrides`` ({NAME: text or value}, names case-insensitive)."""
        values = {n: p.default for n, p in self.params.items()}
        for name, text in (overrides or {}).items():
            key = name.lower()
            if key not in self.params:
                valid = ", ".join(n.upper() for n in self.params) or "none"
                raise PipelineError(f"head {self.name!r} has no parameter {name!r}; valid: {valid}")
            values[key] = self.params[key].parse(name, text)
        return values

    def build(self, params: dict | None = None, seed: int = 0):
        """An unfitted estimator with ``params`` (already parsed, or text) over the defaults."""
        values = self.resolve(params)
        est = self.make(seed)
        est.set_params(**{self.params[n].target: v for n, v in values.items()})
        return est

    def search_grid(self) -> dict:
        """The sweep's grid in estimator parameter names (for GridSearchCV)."""
        return {self.params[n].target: list(v) for n, v in self.grid.items()}

    def describe(self, values: dict) -> str:
        return " ".join(f"{n.upper()}={_show(v)}" for n, v in values.items())


def _show(v):
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "none"
    return str(v)


# --- the Keras dense head ---------------------------------------------------------------------------------

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


def batches(X, y, batch_size, shuffle_seed=None):
    """A tf.data pipeline of (features, label) batches, reshuffled every epoch when ``shuffle_seed`` is given.
    Half the per-epoch time of handing ``fit`` NumPy arrays (22 vs 46 ms for 512 x 1280 features), which on
    cached features is most of an epoch."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((X, y))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(X), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def early_stopping(patience, monitor="val_loss"):
    import keras

    return keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True)


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

    def fit(self, X, y, validation_data=None):
        import keras

        X, y = validate_data(self, X, y, dtype=np.float32)
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

            X, Xv, yi, yv = train_test_split(X, yi, test_size=self.validation_fraction, stratify=yi,
                                             random_state=self.seed)
            val = (Xv, yv)
        else:
            val, monitor = None, "loss"
        keras.utils.set_random_seed(self.seed)
        model = build_model(X.shape[1], len(self.classes_), _ints(self.hidden), self.dropout)
        compile_model(model, self.learning_rate)
        hist = model.fit(batches(X, yi, self.batch_size, self.seed if self.shuffle else None),
                         epochs=self.epochs, verbose=self.verbose, shuffle=False,  # the pipeline shuffles
                         validation_data=None if val is None else batches(*val, self.batch_size),
                         class_weight=keras_class_weight(self.class_weight, yi, len(self.classes_)),
                         callbacks=[early_stopping(self.patience, monitor)])
        self.model_ = model
        self.history_ = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        import keras

        # direct calls in large batches: no per-call tf.function retracing (unlike model.predict in a loop)
        p = np.concatenate([keras.ops.convert_to_numpy(self.model_(X[i:i + 4096], training=False))
                            for i in range(0, len(X), 4096)] or [np.zeros((0, self.model_.output_shape[-1]))])
        p = p.astype(np.float64)
        if p.shape[1] == 1:
            p = np.hstack([1.0 - p, p])
        return p

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


# --- the registry -----------------------------------------------------------------------------------------

def _pipe(clf, scale=True):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline(([("scale", StandardScaler())] if scale else []) + [("clf", clf)])


def _logreg(seed):
    from sklearn.linear_model import LogisticRegression

    return _pipe(LogisticRegression(random_state=seed))


def _linear_svm(seed):
    from sklearn.svm import LinearSVC

    return _pipe(LinearSVC(random_state=seed))


def _svm(seed):
    from sklearn.svm import SVC

    return _pipe(SVC(kernel="rbf", random_state=seed))


def _knn(seed):
    from sklearn.neighbors import KNeighborsClassifier

    return _pipe(KNeighborsClassifier())


def _mlp(seed):
    from sklearn.neural_network import MLPClassifier

    return _pipe(MLPClassifier(random_state=seed))


def _random_forest(seed):
    from sklearn.ensemble import RandomForestClassifier

    return _pipe(RandomForestClassifier(random_state=seed), scale=False)


def _dense(seed):
    return DenseHead(seed=seed)


CW = Param(None, "class_weight", "clf__class_weight", "balanced: weight classes inversely to their frequency")

HEADS = {h.name: h for h in [
    Head("logreg", "sklearn", _logreg, {
        "c": Param(1.0, "float", "clf__C", "inverse L2 regularisation strength"),
        "max_iter": Param(1000, "int", "clf__max_iter", "solver iterations"),
        "class_weight": CW,
    }, grid={"c": [0.001, 0.01, 0.1, 1.0, 10.0]}, class_weights=True,
        help="standardise -> multinomial logistic regression (lbfgs)"),
    Head("linear_svm", "sklearn", _linear_svm, {
        # liblinear's primal solver slows sharply with C on standardised pooled features (flowers5, 2,256 x
        # 1,280: C=0.01 1.6 s, 0.1 15 s, 1 68 s) for no gain in accuracy: a low default and grid
        "c": Param(0.01, "float", "clf__C", "inverse L2 regularisation strength"),
        "max_iter": Param(5000, "int", "clf__max_iter", "solver iterations"),
        "class_weight": CW,
    }, grid={"c": [0.0001, 0.001, 0.01, 0.1]}, class_weights=True,
        help="standardise -> linear SVM (one-vs-rest, squared hinge)"),
    Head("svm", "sklearn", _svm, {
        "c": Param(1.0, "float", "clf__C", "inverse regularisation strength"),
        "gamma": Param("scale", "str", "clf__gamma", "RBF width: scale | auto | a number"),
        "class_weight": CW,
    }, grid={"c": [0.1, 1.0, 10.0, 100.0]}, class_weights=True,
        help="standardise -> RBF-kernel SVM"),
    Head("knn", "sklearn", _knn, {
        "n_neighbors": Param(5, "int", "clf__n_neighbors", "neighbours voting"),
        "vote": Param("uniform", "str", "clf__weights", "uniform | distance (scikit-learn's weights)"),
    }, grid={"n_neighbors": [1, 3, 5, 9, 15]},
        help="standardise -> k nearest neighbours"),
    Head("mlp", "sklearn", _mlp, {
        "hidden": Param((256,), "ints", "clf__hidden_layer_sizes", "hidden layer sizes"),
        "l2": Param(1e-3, "float", "clf__alpha", "L2 penalty (scikit-learn's alpha)"),
        "learning_rate": Param(1e-3, "float", "clf__learning_rate_init", "Adam step size"),
        "max_iter": Param(300, "int", "clf__max_iter", "epochs at most"),
        "early_stopping": Param(True, "bool", "clf__early_stopping", "hold out 10% and stop on its score"),
    }, grid={"l2": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]},
        help="standardise -> scikit-learn MLP (relu, Adam)"),
    Head("random_forest", "sklearn", _random_forest, {
        "n_estimators": Param(300, "int", "clf__n_estimators", "trees"),
        "max_depth": Param(None, "optional_int", "clf__max_depth", "tree depth limit (none = unlimited)"),
        "min_samples_leaf": Param(1, "int", "clf__min_samples_leaf", "smallest leaf"),
        "max_features": Param("sqrt", "str", "clf__max_features", "features per split: sqrt | log2"),
        "class_weight": CW,
    }, grid={"min_samples_leaf": [1, 2, 5, 10]}, class_weights=True,
        help="random forest on raw features (no scaling needed)"),
    Head("dense", "keras", _dense, {
        "hidden": Param((), "ints", "hidden", "hidden relu layers, e.g. 256 or 1024,512 (none = linear)"),
        "dropout": Param(0.2, "float", "dropout", "dropout rate before each dense layer"),
        "learning_rate": Param(1e-3, "float", "learning_rate", "Adam step size"),
        "epochs": Param(100, "int", "epochs", "epochs at most (early stopping on val loss)"),
        "batch_size": Param(32, "int", "batch_size", "rows per step"),
        "patience": Param(5, "int", "patience", "epochs without val-loss improvement before stopping"),
        "class_weight": Param(None, "class_weight", "class_weight", "balanced: weight classes inversely"),
        "validation_fraction": Param(0.15, "float", "validation_fraction",
                                     "held-out share for early stopping when no val split is given"),
    }, grid={"dropout": [0.0, 0.2, 0.5]}, class_weights=True,
        help="Keras: [dropout -> dense relu]* -> dropout -> softmax (sigmoid for 2 classes), Adam"),
]}

SKLEARN_HEADS = tuple(n for n, h in HEADS.items() if h.kind == "sklearn")


def get(name: str) -> Head:
    """The registry entry for ``name``; unknown names fail listing the valid ones."""
    return choose(name, HEADS, "head")


def build(name: str, params: dict | None = None, seed: int = 0):
    """An unfitted estimator for head ``name`` with ``params`` ({NAME: text or value}) over its defaults."""
    return get(name).build(params, seed)


def scores(estimator, X):
    """Per-class scores for ranking (top-k): probabilities when the head has them, else decision values."""
    if hasattr(estimator, "predict_proba"):
        try:
            return estimator.predict_proba(X)
        except AttributeError:
            pass
    s = estimator.decision_function(X)
    if s.ndim == 1:  # binary: the positive class' margin
        s = np.column_stack([-s, s])
    return s
