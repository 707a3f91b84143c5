"""pipeline: cached-feature transfer learning for images on Keras 3.

The Python API, for notebooks and scripts (the CLI is ``python -m pipeline``):

- :func:`features` runs a dataset once through a frozen backbone into the HDF5 cache (the options of
  ``make features``) and returns the cache file's path;
- :func:`load_cache` loads a cache file, after checking it, without TensorFlow: ``c.train.X``, ``c.train.y``,
  ``c.train.paths``, ``c.val``, ``c.test``, ``c.class_names``, ``c.config``; with ``VIEWS=K`` the augmented
  views of the train images in ``c.views`` (``c.views.upto(k)``: the first k of each), with ``TTA=1`` the
  mirrored val/test rows in ``c.tta["val"]``, ``c.tta["test"]`` (row for row with ``c.val``, ``c.test``);
- :func:`audit` looks at the data through the cache (the options of ``make audit``) and writes
  ``<reports>/<cache>/audit/index.html``; returns its summary;
- :func:`predict` labels images with a saved model (fine-tuned, head or export), its record's temperature and
  unknown-image threshold applied;
- :class:`Embedder` is a scikit-learn transformer from image paths to their cached features
  (``make_pipeline(Embedder(...), LogisticRegression())``; :mod:`pipeline.embedder`).

Each function imports what it needs lazily: ``import pipeline`` loads neither TensorFlow nor scikit-learn."""

import os

__version__ = "0.1.0"
__all__ = ["Embedder", "audit", "features", "load_cache", "predict"]


def load_cache(path: str, key: str | None = None):
    """The cache file at ``path`` in memory (:class:`pipeline.cache.store.Cache`), after checking its format,
    completeness, checksums and that every feature is finite (and its ``key`` when given); a bad file is a
    :class:`pipeline.errors.PipelineError` with a one-line message. Imports no TensorFlow."""
    from pipeline.cache import store

    return store.load(str(path), expect_key=key)


def features(**options) -> str:
    """Make sure the cache of ``options`` (the names of ``make features``' options, lower-case: ``data``,
    ``backbone``, ``weights``, ``size``, ...) exists, extracting it when missing or stale; returns its path."""
    from pipeline.cache import extract
    from pipeline.configs import FeaturesConfig, fields
    from pipeline.errors import PipelineError

    valid = fields(FeaturesConfig)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise PipelineError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return extract.run(FeaturesConfig(**options))


def audit(**options) -> dict:
    """Audit the cache of ``options`` (the names of ``make audit``'s options, lower-case: ``data``, ``backbone``,
    ..., ``cache``, ``folds``, ``reject_recall``), made first when missing; returns the summary (each section's
    findings, the paths of ``index.html``, ``summary.json`` and the CSVs). Imports no TensorFlow when the
    cache is current."""
    from pipeline.configs import AuditConfig, fields
    from pipeline.errors import PipelineError
    from pipeline.reports.audit import step

    valid = fields(AuditConfig)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise PipelineError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return step.run(AuditConfig(**options))


def predict(images, model: str = "", models_dir: str = "models", top_k: int = 3) -> list[dict]:
    """Label image files and folders (a path or a list of them) with a saved model (``model``: a record, model
    file or folder; default as ``make predict``): per readable image {"path", "top": [(class, probability),
    ...]}, and "unknown" (bool) when the record has an unknown-image threshold. The record's temperature is
    applied to the probabilities. Unreadable files are left out."""
    from pipeline.serve import find, predict as serve

    paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    files, _, _ = serve.image_paths([str(p) for p in paths])
    return serve.label(find.open_model(str(model), models_dir, log=lambda m: None), files, top_k)[0]


def __getattr__(name):
    """``pipeline.Embedder``, imported when first used: ``import pipeline`` stays without scikit-learn."""
    if name == "Embedder":
        from pipeline.embedder import Embedder

        return Embedder
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
