"""``Embedder``: a scikit-learn transformer from image paths to their cached backbone features.

``make_pipeline(Embedder(backbone=..., data=...), LogisticRegression())`` fits and predicts on lists of image
paths. The features come from the features cache of the tree the paths belong to (``data=``, else the one
class-folder tree all of ``fit``'s paths stand in), made by :func:`pipeline.features` through the one
extraction engine (:func:`pipeline.cache.extract.run`): the tree's images are extracted once, a changed tree
extracts only the images no earlier cache of the same configuration holds (rows lent by content hash,
:mod:`pipeline.cache.reuse`), and every later fit or transform (clones in ``GridSearchCV`` included) finds
the cache up to date and extracts nothing. Rows are matched to paths by relative path, never by position.

scikit-learn's estimator checks that apply to a transformer whose input is a list of paths, and hold here:
``check_parameters_default_constructible``, ``check_no_attributes_set_in_init``,
``check_get_params_invariance``, ``check_set_params``, ``check_do_not_raise_errors_in_init_or_set_params``
(``__init__`` only stores its arguments; ``clone`` works); and, run on paths instead of numeric arrays:
``check_estimators_overwrite_params`` (fit leaves the parameters as they were), ``check_dont_overwrite_parameters``
(fit adds only attributes ending in ``_``), ``check_dict_unchanged`` (transform changes no attribute),
``check_fit_idempotent``, ``check_transformer_general`` (``fit_transform`` equals ``fit().transform()``),
``check_estimators_unfitted`` (``NotFittedError``) and ``check_estimators_pickle``. Those written for numeric
2-D input do not apply: ``n_features_in_`` and ``feature_names_in_`` (the input is not a feature matrix), dtype,
NaN/inf, sparse and 1-D/2-D shape checks; ``get_feature_names_out`` names the output columns only.

scikit-learn is imported with this module; ``pipeline`` imports it only when ``pipeline.Embedder`` is used."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from pipeline import features, load_cache  # the public API: this module sits on top, beside it
from pipeline.errors import PipelineError


def _paths(X) -> list[str]:
    """``X`` (a list or array of paths; an (n, 1) array is taken as its column) as absolute paths."""
    if isinstance(X, (str, os.PathLike)):
        raise PipelineError("Embedder: give a list of image paths, not one path (wrap it in a list)")
    arr = np.asarray(X, dtype=object)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or not all(isinstance(p, (str, os.PathLike)) for p in arr):
        raise PipelineError(f"Embedder: the input must be a list of image paths (got an array of shape "
                            f"{arr.shape} of {type(arr.flat[0]).__name__ if arr.size else 'nothing'})")
    if not len(arr):
        raise PipelineError("Embedder: the list of image paths is empty")
    return [os.path.abspath(os.fspath(p)) for p in arr]


def _tree(data, paths) -> str:
    """The class-folder tree of the cache: ``data``, else the one folder holding the class folders of every path."""
    if data:
        tree = os.path.abspath(os.fspath(data))
        if not os.path.isdir(tree):
            raise PipelineError(f"Embedder data={data}: no such folder; give the class-folder tree the paths are in")
        return tree
    tops = sorted({os.path.dirname(os.path.dirname(p)) for p in paths})
    if len(tops) != 1:
        raise PipelineError(f"Embedder: the paths are not in one class-folder tree (<tree>/<class>/<image>; found "
                            f"{len(tops)} trees, e.g. {tops[0]}); set data= to the tree they belong to")
    return tops[0]


def _relpaths(tree, paths) -> list[str]:
    """Each path relative to ``tree``; a path outside it is a one-line error."""
    out = []
    for p in paths:
        rel = os.path.relpath(p, tree)
        if rel == os.curdir or rel.split(os.sep)[0] == os.pardir or os.path.isabs(rel):
            raise PipelineError(f"{p}: not an image of the Embedder's tree {tree}; give paths inside it, or fit "
                                "with data= set to the tree this image belongs to")
        out.append(rel)
    return out


def rows_of(cache, relpaths) -> np.ndarray:
    """The features of ``relpaths`` in ``cache`` (what :func:`pipeline.load_cache` returns), in their
    order, found by relative path in any split; a path the cache lacks is a one-line error."""
    where = {}
    for s, split in cache.splits.items():
        where.update((str(rel), (s, r)) for r, rel in enumerate(split.paths))
    missing = [rel for rel in relpaths if rel not in where]
    if missing:
        report = cache.path[:-len(".h5")] + ".skipped.tsv"
        raise PipelineError(f"{missing[0]}: not in the cache {cache.path} ({len(missing)} path(s) missing): "
                            f"not an image file of the tree, or left out by the scan (see {report})")
    dim = next(iter(cache.splits.values())).features.shape[1]
    out = np.empty((len(relpaths), dim), np.float32)
    for s, split in cache.splits.items():
        pos = [j for j, rel in enumerate(relpaths) if where[rel][0] == s]
        if pos:
            out[pos] = split.features[[where[relpaths[j]][1] for j in pos]]
    return out


class Embedder(TransformerMixin, BaseEstimator):
    """Image paths -> their frozen-backbone features (``float32``, one row a path, in input order) from the
    features cache of their class-folder tree, extracted only where the cache lacks them.

    Parameters are ``make features``' options of the same names; ``data``: the class-folder tree the paths
    belong to ("" = the one tree holding every path given to ``fit``); ``verbose``: print the features run's
    lines. ``fit`` makes sure the tree's cache exists and records ``data_`` (the tree), ``config_`` (the
    :func:`pipeline.features` options used), ``cache_`` (the cache file) and ``n_features_out_``.
    ``transform`` makes sure again (a changed tree extracts what it lacks) and reads the paths' rows; ``y`` is
    ignored."""

    def __init__(self, backbone="efficientnet_lite0", size=0, pooling="avg", weights="imagenet", alpha=0.0,
                 cache_dir="cache", data="", verbose=True):
        self.backbone = backbone
        self.size = size
        self.pooling = pooling
        self.weights = weights
        self.alpha = alpha
        self.cache_dir = cache_dir
        self.data = data
        self.verbose = verbose

    def _embed(self, config, tree, paths):
        """(cache file, rows of ``paths``): the cache of ``config`` (features options) made sure of, then read."""
        relpaths = _relpaths(tree, paths)  # a path outside the tree: said before anything is scanned
        with contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO()):
            path = features(**config)
        return path, rows_of(load_cache(path), relpaths)

    def _fit(self, X):
        paths = _paths(X)
        tree = _tree(self.data, paths)
        config = {"data": tree, "backbone": self.backbone, "weights": self.weights, "size": int(self.size),
                  "alpha": float(self.alpha), "pooling": self.pooling, "cache_dir": os.fspath(self.cache_dir)}
        path, rows = self._embed(config, tree, paths)
        self.data_, self.config_, self.cache_, self.n_features_out_ = tree, config, path, int(rows.shape[1])
        return rows

    def fit(self, X, y=None):
        """Record the configuration and the paths' tree, and make sure its cache exists; returns ``self``."""
        self._fit(X)
        return self

    def fit_transform(self, X, y=None, **fit_params):
        """``fit(X).transform(X)``, the cache made sure of and read once."""
        return self._fit(X)

    def transform(self, X):
        """The features of the paths ``X``, row for row, from the fitted tree's cache (made up to date first)."""
        check_is_fitted(self, "config_")
        paths = _paths(X)
        return self._embed(self.config_, self.data_, paths)[1]

    def get_feature_names_out(self, input_features=None):
        """``embedder0``, ``embedder1``, ...: one name per feature column (the input, paths, has none)."""
        check_is_fitted(self, "n_features_out_")
        return np.asarray([f"embedder{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.one_d_array, tags.input_tags.two_d_array, tags.input_tags.string = True, False, True
        tags.transformer_tags.preserves_dtype = []  # float32 features whatever the input
        return tags
