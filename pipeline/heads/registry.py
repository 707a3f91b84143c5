"""The registry of heads, as data: each one is trained on cached pooled features.

An entry holds a factory ``make(seed) -> estimator`` (a scikit-learn Pipeline, with standardisation where
it helps, or a :class:`pipeline.heads.dense.DenseHead`), its hyper-parameters with types and defaults (each one names the
estimator parameter it sets, so ``HIDDEN=1024,512`` or ``C=0.1`` reach the right place), the grid of its
main regularisation for the sweep, and whether it takes class weights.

Parameter names never repeat an option of the ``head`` step (``ALPHA``, ``WEIGHTS`` and ``SEED`` select
the cache), hence ``L2`` for the MLP's alpha and ``VOTE`` for k-NN's weights.

scikit-learn and the dense head (Keras) are imported lazily, in the factories: listing the registry
(``make heads``) and a scikit-learn head's loop load neither more than they use."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import PipelineError, choose
from pipeline.heads.params import Param, show


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
        return " ".join(f"{n.upper()}={show(v)}" for n, v in values.items())



def _pipe(clf, scale=True):
    from sklearn.pipeline import Pipeline

    from pipeline.heads.scaler import FlooredScaler

    return Pipeline(([("scale", FlooredScaler())] if scale else []) + [("clf", clf)])


def _logreg(seed):
    from sklearn.linear_model import LogisticRegression

    return _pipe(LogisticRegression(random_state=seed))


def _linear_svm(seed):
    from sklearn.svm import LinearSVC

    # the dual solver with a looser tolerance converges in a fraction of the primal's time on standardised
    # pooled features, to the same accuracy (make bench's headloop section times the sweep)
    return _pipe(LinearSVC(dual=True, tol=1e-3, random_state=seed))


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
    from pipeline.heads.dense import DenseHead

    return DenseHead(seed=seed)


CW = Param(None, "class_weight", "clf__class_weight", "balanced: weight classes inversely to their frequency")

HEADS = {h.name: h for h in [
    Head("logreg", "sklearn", _logreg, {
        "c": Param(1.0, "float", "clf__C", "inverse L2 regularisation strength"),
        "max_iter": Param(1000, "int", "clf__max_iter", "solver iterations"),
        "class_weight": CW,
    }, grid={"c": [0.01, 0.1, 1.0]}, class_weights=True,
        help="standardise -> multinomial logistic regression (lbfgs)"),
    Head("linear_svm", "sklearn", _linear_svm, {
        # liblinear's primal solver slows sharply with C on standardised pooled features (flowers5, 2,256 x
        # 1,280: C=0.01 1.6 s, 0.1 15 s, 1 68 s) for no gain in accuracy: a low default and grid
        "c": Param(0.01, "float", "clf__C", "inverse L2 regularisation strength"),
        "max_iter": Param(5000, "int", "clf__max_iter", "solver iterations"),
        "class_weight": CW,
    }, grid={"c": [0.0001, 0.001]}, class_weights=True,
        help="standardise -> linear SVM (one-vs-rest, squared hinge)"),
    Head("svm", "sklearn", _svm, {
        "c": Param(1.0, "float", "clf__C", "inverse regularisation strength"),
        "gamma": Param("scale", "str", "clf__gamma", "RBF width: scale | auto | a number"),
        "class_weight": CW,
    }, grid={"c": [1.0, 10.0]}, class_weights=True,
        help="standardise -> RBF-kernel SVM"),
    Head("knn", "sklearn", _knn, {
        "n_neighbors": Param(5, "int", "clf__n_neighbors", "neighbours voting"),
        "vote": Param("uniform", "str", "clf__weights", "uniform | distance (scikit-learn's weights)"),
    }, grid={"n_neighbors": [3, 9, 15]},
        help="standardise -> k nearest neighbours"),
    Head("mlp", "sklearn", _mlp, {
        "hidden": Param((256,), "ints", "clf__hidden_layer_sizes", "hidden layer sizes"),
        "l2": Param(1e-3, "float", "clf__alpha", "L2 penalty (scikit-learn's alpha)"),
        "learning_rate": Param(1e-3, "float", "clf__learning_rate_init", "Adam step size"),
        "max_iter": Param(300, "int", "clf__max_iter", "epochs at most"),
        "early_stopping": Param(True, "bool", "clf__early_stopping", "hold out 10% and stop on its score"),
    }, grid={"l2": [1e-3, 1e-1]},
        help="standardise -> scikit-learn MLP (relu, Adam)"),
    Head("random_forest", "sklearn", _random_forest, {
        "n_estimators": Param(100, "int", "clf__n_estimators", "trees"),
        "max_depth": Param(None, "optional_int", "clf__max_depth", "tree depth limit (none = unlimited)"),
        "min_samples_leaf": Param(1, "int", "clf__min_samples_leaf", "smallest leaf"),
        "max_features": Param("sqrt", "str", "clf__max_features", "features per split: sqrt | log2"),
        "class_weight": CW,
    }, grid={"min_samples_leaf": [1, 4]}, class_weights=True,
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
    }, grid={"dropout": [0.2, 0.5]}, class_weights=True,
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


def list_heads() -> str:
    lines = []
    for h in HEADS.values():
        lines.append(f"{h.name}  ({h.kind}{', class weights' if h.class_weights else ''}): {h.help}")
        for n, p in h.params.items():
            grid = f"  sweep: {', '.join(map(show, h.grid[n]))}" if n in h.grid else ""
            lines.append(f"    {n.upper():<20} {show(p.default):<10} {p.help}{grid}")
    return "\n".join(lines)
