"""Content-named saves switched into place by a record: how every saved model is written (heads, the fine-tuned
model, exports, the stored OpenVINO model).

An artifact (a file or a folder) is written into a temporary folder beside its destination (:func:`staging`),
then renamed to a name of its content, ``<name>-<sha12><ext>`` (:func:`put`), so a new save never replaces what
the current record names. The record is written last, atomically (:func:`switch`): until then the previous
record and its files stand. Only then are the files no record names removed (:func:`remove_stale`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile

from pipeline import records


def tree_digest(path: str) -> tuple[str, dict]:
    """(sha256, {relative path: sha256}) of a file, or of every file under a folder (names and contents)."""
    if not os.path.isdir(path):
        return records.file_digest(path), {}
    files = {}
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, path).replace(os.sep, "/")] = records.file_digest(full)
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest(), files


def tree_bytes(path: str) -> int:
    """The size of a file, or of every file under a folder."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@contextlib.contextmanager
def staging(folder: str, name: str):
    """A temporary folder ``.<name>.<random>.tmp`` in ``folder`` (made when missing), removed afterwards
    however the block ends."""
    os.makedirs(folder, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def put(src: str, final: str, sha: str | None = None) -> None:
    """Rename the staged file or folder ``src`` to ``final`` in one step. ``final`` is content-named: a file
    there is replaced by the same bytes; a folder there of the same content (``sha``) is kept as it is."""
    if os.path.isdir(final) and not os.path.islink(final):
        if tree_digest(final)[0] == (sha or tree_digest(src)[0]):
            return
        shutil.rmtree(final)
    os.replace(src, final)


def save(folder: str, name: str, ext: str, write) -> tuple[str, str, dict]:
    """(path, sha256, {file: sha256} of a folder) of what ``write(target)`` makes at a temporary ``target``
    (ending in ``ext``), put in place as ``<folder>/<name>-<sha12><ext>``."""
    with staging(folder, name) as work:
        target = os.path.join(work, "artifact" + ext)
        write(target)
        sha, files = tree_digest(target)
        path = os.path.join(folder, f"{name}-{sha[:12]}{ext}")
        put(target, path, sha)
    return path, sha, files


def remove_stale(folder: str, pattern, keep) -> None:
    """Remove the files and folders of ``folder`` whose names match ``pattern`` (a compiled regular expression,
    matched whole) except those in ``keep``; other names are left alone."""
    for f in os.listdir(folder):
        if f in keep or not pattern.fullmatch(f):
            continue
        path = os.path.join(folder, f)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def switch(rec_path: str, record: dict, pattern, keep) -> None:
    """Write ``record`` atomically at ``rec_path`` (the switch), then remove what matches ``pattern`` in its
    folder and is not in ``keep`` (the names the record holds)."""
    records.write_json(rec_path, record)
    remove_stale(os.path.dirname(os.path.abspath(rec_path)), pattern, set(keep))
