"""Export verification: the images an export is checked on, and the artifact written by Keras, loaded back
with its own runtime, compared with the Keras model and only then put in place (see :mod:`pipeline.serve.export`).
The ``onnx`` package (an optional extra) is imported lazily, by the ONNX export alone."""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import tensorflow as tf

from pipeline import artifacts as saved
from pipeline.backbones.extractor import compiled_call
from pipeline.configs import ExportConfig
from pipeline.data import images
from pipeline.errors import PipelineError
from pipeline.serve import judge, open_export as exports, predict, quantize, runner as base
from pipeline.serve.open_export import Format


def verification_pixels(runner, cfg: ExportConfig, log=print) -> tuple[np.ndarray, str]:
    """(uint8 pixels, where they come from): up to ``VERIFY_IMAGES`` of the given ``IMAGES``, else of the test
    split of the cache the model was made from, else (no cache) seeded random pixels, said so."""
    n, size, interp = cfg.verify_images, runner.size, runner.interpolation
    if cfg.images:
        x = given_pixels(cfg.images, n, size, interp, cfg.batch, runner.max_pixels)
        return x, f"{len(x)} given image(s)"
    cache_path, key = runner.source.get("cache_path"), runner.source.get("cache_key")
    if cache_path and os.path.exists(cache_path):
        x = cache_test_pixels(cache_path, key, n, size, interp, runner.max_pixels)
        if len(x):
            return x, f"{len(x)} test image(s) of {os.path.basename(cache_path)}"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (min(n, 16), size, size, 3), dtype=np.uint8)
    log(f"note: the cache {cache_path} is gone: verifying on {len(x)} seeded random images (IMAGES=... to give some)")
    return x, f"{len(x)} seeded random image(s) (the cache is gone)"


def given_pixels(text, n, size, interpolation, batch, max_pixels) -> np.ndarray:
    """Up to ``n`` readable images of ``IMAGES``, decoded as predict decodes them."""
    files, _, _ = predict.image_paths(predict.split_images(text))
    got = []
    for _, pixels, _ in predict.decode_batches(files, size, interpolation, batch, max_pixels):
        if pixels is not None:
            got.append(pixels)
        if sum(len(p) for p in got) >= n:
            break
    if not got:
        raise PipelineError(f"IMAGES={text}: no readable image to verify the export on")
    return np.concatenate(got)[:n]


def cache_test_pixels(cache_path, key, n, size, interpolation, max_pixels=images.MAX_PIXELS) -> np.ndarray:
    """Up to ``n`` test images of a cache, decoded as for the cache (built-in sources made again)."""
    return judge.cache_images(cache_path, key, "test", size, interpolation, max_pixels, n=n)[0]


def batched(call, x, batch):
    return np.concatenate([np.asarray(call(x[i:i + batch])) for i in range(0, len(x), batch)])


def write_artifact(model, fmt: Format, target: str, size: int) -> None:
    """``model`` written as ``fmt`` at ``target`` by Keras itself: ``Model.save`` or ``Model.export``."""
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32, name="pixels")]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*np.object.*", category=FutureWarning)  # Keras' tf2onnx patch
            if fmt.name == "keras":
                model.save(target)
            elif fmt.name == "openvino":  # an .xml and its .bin: one folder, switched into place whole
                os.mkdir(target)
                model.export(os.path.join(target, "model.xml"), format="openvino", verbose=False,
                             input_signature=signature)
            else:
                model.export(target, format=fmt.name, verbose=False, input_signature=signature)
    except (ImportError, ModuleNotFoundError) as e:
        raise PipelineError(f"FORMAT={fmt.name}: Keras' exporter needs {e.name or e}: pip install "
                            f"'pipeline[{fmt.extra or fmt.name}]'") from None


def add_onnx_metadata(path: str, metadata: dict) -> None:
    """Write ``metadata`` ({key: value}, values as text) into the ONNX file's ``metadata_props``."""
    import onnx

    model = onnx.load(path)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        **{k: str(v) for k, v in metadata.items()}})
    onnx.save(model, path)


def compare(fmt: Format, got, reference, n_images, output, tolerance, score_tolerance) -> dict:
    """How the artifact's outputs ``got`` differ from the Keras model's ``reference``: a PipelineError past the
    tolerance, else the figures of the record's ``verification``."""
    if got.shape != reference.shape:
        raise PipelineError(f"FORMAT={fmt.name}: the artifact gives {got.shape[1:]} per image, the Keras model "
                            f"{reference.shape[1:]}; not saved")
    diff = float(np.max(np.abs(got.astype(np.float64) - reference))) if len(got) else 0.0
    agree = int(np.sum(base.expand(got).argmax(1) == base.expand(reference).argmax(1)))
    scale = max(1.0, float(np.max(np.abs(reference)))) if len(reference) else 1.0
    relative = diff / scale
    if output == "score" and not relative <= score_tolerance:
        raise PipelineError(f"FORMAT={fmt.name}: the artifact's decision values differ from the Keras model's by "
                            f"up to {diff:.3g} ({relative:.3g} of the largest) on {n_images} images "
                            f"(SCORE_TOLERANCE={score_tolerance:g}); not saved")
    if output != "score" and not diff <= tolerance:
        raise PipelineError(f"FORMAT={fmt.name}: the artifact's outputs differ from the Keras model's by up to "
                            f"{diff:.3g} on {n_images} images (TOLERANCE={tolerance:g}); not saved")
    return {"images": int(n_images), "max_abs_diff": diff,
            **({"max_relative_diff": relative, "score_tolerance": score_tolerance} if output == "score"
               else {"tolerance": tolerance}),
            "argmax_agree": agree, "reference": "the Keras model, float32, BatchNorm as built (not folded)"}


def write_verified(model, fmt: Format, folder: str, name: str, pixels: np.ndarray, size: int, tolerance: float,
                   batch: int = 32, reference_model=None, output="probability",
                   score_tolerance: float = 1e-3, metadata: dict | None = None, mode: str = "none",
                   representative=None, judged=None) -> tuple[str, str, dict, dict, dict | None]:
    """(artifact path, sha256, {file: sha256} of a folder, verification) of ``model`` exported as ``fmt`` into a
    temporary folder in ``folder``, loaded back with its runtime, compared on ``pixels`` with the Keras model
    (``reference_model``, default ``model``) and only then renamed into place as ``<name>-<sha12><ext>``.

    Probabilities may differ by ``tolerance`` at most. Decision values (``output="score"``) are unbounded and
    amplify float rounding in the features by the coefficients (the scaler's 1/std): their difference is taken
    relative to the largest |value| (at least 1), up to ``score_tolerance``. ``metadata`` goes into an ONNX
    file's ``metadata_props``. A quantised ``mode`` is written by :mod:`pipeline.serve.quantize` (int8 calibrated
    on ``representative()``) and not compared; ``judged(call, path)``, when given, judges the staged artifact
    (raising to keep it out of place) and gives its row."""
    reference = (batched(compiled_call(reference_model or model, size, fold=False), pixels, batch)  # as built
                 if mode == "none" else None)
    with saved.staging(folder, name) as work:
        target = os.path.join(work, "artifact" + fmt.ext)
        t0 = time.perf_counter()
        if mode == "none":
            write_artifact(model, fmt, target, size)
        else:
            quantize.write(model, fmt, mode, target, size, write_artifact, representative)
        if fmt.name == "onnx" and metadata:
            add_onnx_metadata(target, metadata)
        export_secs = time.perf_counter() - t0
        t0 = time.perf_counter()
        call = exports.runtime(fmt, target, size, fold=False)
        if mode == "none":
            got = batched(lambda x: call(x.astype(np.float32)), pixels, batch)
            verification = compare(fmt, got, reference, len(pixels), output, tolerance, score_tolerance)
        else:
            verification = {"images": 0, "skipped": f"QUANTIZE={mode}: not held to TOLERANCE; judged on the test split"}
        verify_secs = time.perf_counter() - t0
        judgement = judged(call, target) if judged else None
        sha, files = saved.tree_digest(target)
        final = os.path.join(folder, f"{name}-{sha[:12]}{fmt.ext}")
        saved.put(target, final, sha)  # one step: a folder appears whole
    verification.update(export_seconds=round(export_secs, 3), verify_seconds=round(verify_secs, 3))
    return final, sha, files, verification, judgement
