"""Moved to :mod:`pipeline.lock`; this name stays for the modules of the cache that still import it here."""

from pipeline.lock import LOCK, busy, locked  # noqa: F401
