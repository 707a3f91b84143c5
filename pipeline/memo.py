"""What a cache folder remembers between runs (checked images, content hashes of files, weights digests, cache files verified), in one
SQLite file ``<folder>/memo.sqlite`` in WAL mode. A memo is a cache of checks: a table of key -> JSON value,
read whole when first looked up; :meth:`Table.save` writes only the entries this run changed, in one transaction, so
runs writing at once lose nothing. A memo that cannot be read or written only costs the next run its checks."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time

NAME = "memo.sqlite"
TABLES = ("checks", "hashes", "weights", "verified")
TIMEOUT = 60.0  # seconds a write waits for another run's write to end


def at(path: str) -> str:
    """The memo file for ``path``: ``path`` itself when it ends in .sqlite, else ``memo.sqlite`` in its folder
    (callers may name any file there, e.g. the former ``checked-images.json``)."""
    return path if path.endswith(".sqlite") else os.path.join(os.path.dirname(os.path.abspath(path)), NAME)


def _connect(db: str) -> sqlite3.Connection:
    """A connection with WAL on and every table made. Two runs opening a new file at once can get "database is
    locked" from the journal-mode switch without SQLite's busy wait, so the set-up is tried again until TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        con = sqlite3.connect(db, timeout=TIMEOUT)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            for t in TABLES:
                con.execute(f"CREATE TABLE IF NOT EXISTS {t} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            con.commit()
            return con
        except sqlite3.OperationalError as e:
            con.close()
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        except BaseException:
            con.close()
            raise


class Table:
    """One table of the memo file ``db`` (None: nothing is kept): key -> JSON value. The table is read whole
    when first looked up; a run that only puts (extraction recording its decodes) never reads it."""

    def __init__(self, db: str | None, table: str):
        if table not in TABLES:
            raise ValueError(f"unknown memo table {table!r}")
        self.db, self.table, self._values, self.changed = db, table, None, {}

    @property
    def values(self) -> dict:
        """Every entry: the file's, with this run's changes over them."""
        if self._values is None:
            self._values = self._read()
        return self._values

    def _read(self) -> dict:
        values = {}
        if self.db and os.path.exists(self.db):
            with contextlib.suppress(sqlite3.Error, OSError):
                with contextlib.closing(_connect(self.db)) as con:
                    for key, value in con.execute(f"SELECT key, value FROM {self.table}"):
                        with contextlib.suppress(ValueError):
                            values[key] = json.loads(value)
        return {**values, **self.changed}

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def put(self, key: str, value) -> None:
        """Remember ``value`` (JSON-able) for ``key``; written by :meth:`save`."""
        if self._values is not None:
            if key in self._values and self._values[key] == value:
                return
            self._values[key] = value
        self.changed[key] = value

    def save(self) -> bool:
        """Write this run's changes; False when the memo cannot be written (left for the next run to redo)."""
        if not self.changed or not self.db:
            return True
        changed = dict(self.changed)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.db)), exist_ok=True)
            with contextlib.closing(_connect(self.db)) as con, con:
                con.executemany(f"INSERT OR REPLACE INTO {self.table} (key, value) VALUES (?, ?)",
                                [(k, json.dumps(v)) for k, v in changed.items()])
        except (sqlite3.Error, OSError):
            return False
        for k, v in changed.items():
            if self.changed.get(k) is v:  # not put again meanwhile
                del self.changed[k]
        return True


def copy(src: str, dst: str) -> None:
    """Copy the memo file ``src`` to ``dst`` (consistent even while another run writes it); none: nothing."""
    if not os.path.exists(src):
        return
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with contextlib.closing(sqlite3.connect(src, timeout=TIMEOUT)) as a, \
            contextlib.closing(sqlite3.connect(dst, timeout=TIMEOUT)) as b:
        a.backup(b)
