"""Atomic writes, file hashes, version records: what every output of the pipeline relies on."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from importlib import metadata

from pipeline.errors import PipelineError

_UMASK = os.umask(0o022)  # read once (it can only be read by setting it) and put back
os.umask(_UMASK)

VERSIONED = ("pipeline", "tensorflow", "keras", "h5py", "numpy", "scikit-learn", "joblib")


def versions(packages=VERSIONED) -> dict:
    """Installed versions of the packages that shape an output."""
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def file_digest(path: str, block: int = 1 << 20) -> str:
    """sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def digest(obj) -> str:
    """sha256 of a JSON-able object in canonical form."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=folder)
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except OSError as e:  # named by the file asked for, not its hidden temporary one (nor by none: a failed write)
        if e.filename is None or str(e.filename).startswith(os.path.join(folder, f".{os.path.basename(path)}.")):
            e.filename, e.filename2 = path, None
        raise
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def checked_file(rec_path: str, rec: dict, suffix: str, remake: str) -> str:
    """The file a record names beside itself, after checking its name, that it exists and that its sha256
    is the recorded one; ``remake`` tells how to make it again."""
    name = str(rec.get("file") or "")
    if os.path.dirname(name) or not name.endswith(suffix):
        raise PipelineError(f"{rec_path}: record names an unexpected file {name!r}")
    path = os.path.join(os.path.dirname(rec_path), name)
    if not os.path.exists(path):
        raise PipelineError(f"{path}: missing (its record {rec_path} remains); {remake}")
    if file_digest(path) != rec.get("sha256"):
        raise PipelineError(f"{path}: changed since it was saved (sha256 differs from its record); "
                            f"refusing to load it: {remake}")
    return path


def write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing") from None
    except ValueError as e:
        raise PipelineError(f"{path}: not valid JSON ({e}); delete it and rerun the step that makes it") from None


def check_versions(recorded: dict, path: str, packages=("keras", "scikit-learn", "tensorflow")) -> None:
    """Refuse an artifact made with another major.minor version of a package whose format matters."""
    now = versions(packages)
    for p in packages:
        was, is_ = recorded.get(p), now.get(p)
        if was and is_ and was.split(".")[:2] != is_.split(".")[:2]:
            raise PipelineError(f"{path} was made with {p} {was}, this is {p} {is_}: "
                                "retrain it with this installation")


def keras_home(folder: str = "") -> str:
    """The Keras cache folder: ``folder`` when given, else as Keras resolves it ($KERAS_HOME or ~/.keras)."""
    if folder:
        return os.path.abspath(folder)
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def use_keras_home(folder: str) -> None:
    """Make ``folder`` the Keras cache folder. Keras reads $KERAS_HOME once, when it is first imported, so
    this sets it before that import (the CLI calls it before TensorFlow is loaded); a Keras already imported
    with another folder is a one-line error rather than a silently ignored option."""
    if not folder:
        return
    folder = os.path.abspath(folder)

    if "keras" in sys.modules:
        current = keras_home()  # what Keras read at its import, unless the environment changed since
        if os.path.abspath(current) != folder:
            raise PipelineError(f"KERAS_HOME={folder}: Keras was already imported with {current}; set the "
                                "KERAS_HOME environment variable before Python imports Keras")
    os.environ["KERAS_HOME"] = folder


def writable_file(path: str, option: str) -> str:
    """``path`` as a file this process can write (its folder made when missing, the folder checked as by
    :func:`writable_dir`), before long work starts; otherwise a one-line error naming the option."""
    if os.path.isdir(path):
        raise PipelineError(f"{option}={path}: is a folder; name a file")
    folder = os.path.dirname(os.path.abspath(path))
    writable_dir(folder, option, shown=f"{option}={path}: its folder {folder}")
    return path


def writable_dir(path: str, option: str, shown: str = "") -> str:
    """``path`` as a folder this process can write into (made when missing), checked before long work
    starts; otherwise a one-line error naming the option (as ``shown``), the path and the reason."""
    shown = shown or f"{option}={path}"
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.exists(path) and not os.path.isdir(path):
        raise PipelineError(f"{shown}: is a file, not a folder; name a folder")
    if not os.path.isdir(probe):
        raise PipelineError(f"{shown}: {probe} is a file, so no folder can be made under it; name another folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PipelineError(f"{shown}: cannot write there ({e.strerror or e}); name a writable folder") from None
    return path
