"""The OpenVINO model of a frozen extractor, stored between runs in the cache folder, so that a run with
RUNTIME=openvino whose weights digest is known (the weights memo, :mod:`pipeline.cache.weights`) neither
builds the extractor in TensorFlow nor converts it again.

``<cache_dir>/openvino/<id>.json`` is the record: ``<id>`` is a digest of everything the model is made from
(:func:`made_from`); it names the IR files ``<id>-<sha12>.xml`` and ``<id>-<sha12>.bin`` (sha12 of their
contents) and holds their sha256. They are saved as :mod:`pipeline.artifacts` saves: written in a temporary
folder and renamed, the record last: a record names complete files only, and a crash leaves at worst files no
record names (removed by the next save of that id). A model is read only after its record matches and the
bytes read hash to the record's; anything else is a one-line warning, and the model is converted again.
Weights are stored in float32 (``compress_to_fp16=False``): the stored model computes what the converted one
does, bit for bit. OpenVINO (an optional extra) is imported lazily, by :func:`save`, the one function that
needs its Python API.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re

from pipeline import artifacts, records
from pipeline.errors import PipelineError

FORMAT = "pipeline-openvino-ir/1"  # bump when the conversion changes what it makes
FOLDER = "openvino"
VERSIONS = ("pipeline", "openvino", "tensorflow", "keras")  # what builds, freezes and converts the graph
FIELDS = ("backbone", "size", "alpha", "preprocessing", "pooling", "fold_batchnorm", "extract_version")


def made_from(identity: dict) -> dict:
    """What the OpenVINO model of a cache's extractor depends on, from the cache's identity
    (:class:`pipeline.cache.plan.Plan`): the backbone, its weights digest, size, alpha, preprocessing, pooling,
    BatchNorm folding, the extraction version, this store's format and the converting packages' versions. Not
    the images, the stored dtype, the views (outside the graph) nor the precision (a compile-time hint)."""
    gem = {"gem_p": identity["gem_p"]} if "gem_p" in identity else {}  # POOLING=gem only: other keys unchanged
    return {**{k: identity.get(k) for k in FIELDS}, **gem, "weights_sha256": identity["weights"]["sha256"],
            "format": FORMAT, "versions": records.versions(VERSIONS)}


def record_path(cache_dir: str, source: dict) -> str:
    return os.path.join(cache_dir, FOLDER, records.digest(source) + ".json")


def _problem(rec, ident: str, source: dict) -> str | None:
    """What is wrong with a record, or None."""
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        return "not a stored OpenVINO model record of this program"
    if rec.get("made_from") != source:
        return "its record was made from something else"
    files, sha = rec.get("files"), rec.get("sha256")
    if not isinstance(files, dict) or not isinstance(sha, dict):
        return "its record lacks its files"
    for ext in ("xml", "bin"):
        name = files.get(ext)
        if not isinstance(name, str) or os.path.dirname(name) or not name.startswith(ident + "-") \
                or not name.endswith("." + ext) or not isinstance(sha.get(ext), str):
            return f"its record names an unexpected {ext} file {name!r}"
    return None


def load(cache_dir: str, source: dict, core, log=print):
    """The stored ``openvino.Model`` made from ``source``, read by ``core``; None when there is none, or (with a
    one-line warning) when its record or files do not check out."""
    path = record_path(cache_dir, source)
    if not os.path.exists(path):
        return None
    ident = os.path.basename(path)[:-len(".json")]
    try:
        rec = records.read_json(path)
        why = _problem(rec, ident, source)
        if why is None:
            data = {}
            for ext in ("xml", "bin"):
                with open(os.path.join(os.path.dirname(path), rec["files"][ext]), "rb") as f:
                    data[ext] = f.read()
                if hashlib.sha256(data[ext]).hexdigest() != rec["sha256"][ext]:
                    why = f"{rec['files'][ext]} changed since it was stored (sha256 differs from its record)"
                    break
    except (OSError, PipelineError) as e:
        why = str(e).splitlines()[0] if isinstance(e, PipelineError) else f"cannot be read ({e.strerror or e})"
    if why is None:
        try:
            return core.read_model(data["xml"], data["bin"])  # the bytes checked, not the files again
        except RuntimeError as e:
            why = f"OpenVINO cannot read it ({str(e).splitlines()[0][:200]})"
    log(f"warning: stored OpenVINO model {path}: {why}; converting it again")
    return None


def save(cache_dir: str, source: dict, model, log=print) -> str | None:
    """Store ``model`` (an ``openvino.Model``) as made from ``source``; returns its record's path. A folder that
    cannot be written only costs the next run a conversion (one-line warning, None)."""
    import openvino as ov

    path = record_path(cache_dir, source)
    folder, ident = os.path.dirname(path), os.path.basename(path)[:-len(".json")]
    try:
        with artifacts.staging(folder, ident) as work:
            ov.save_model(model, os.path.join(work, "model.xml"), compress_to_fp16=False)
            sha = {ext: records.file_digest(os.path.join(work, "model." + ext)) for ext in ("xml", "bin")}
            tag = records.digest(sha)[:12]
            files = {ext: f"{ident}-{tag}.{ext}" for ext in ("xml", "bin")}
            for ext in ("xml", "bin"):
                artifacts.put(os.path.join(work, "model." + ext), os.path.join(folder, files[ext]))
        record = {"format": FORMAT, "made_from": source, "files": files, "sha256": sha,
                  "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        artifacts.switch(path, record, re.compile(re.escape(ident) + "-.*"), files.values())
    except (OSError, RuntimeError) as e:
        log(f"warning: the OpenVINO model could not be stored in {folder} ({str(e).splitlines()[0][:200]}); "
            "the next run converts it again")
        return None
    return path


def get(cache_dir: str, source: dict, convert, core, log=print):
    """The stored model made from ``source`` when it checks out, else ``convert()``'s, stored."""
    model = load(cache_dir, source, core, log)
    if model is None:
        model = convert()
        save(cache_dir, source, model, log)
    return model
