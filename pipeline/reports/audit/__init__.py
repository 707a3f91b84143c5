"""The audit: the data looked at through the cache (label issues, duplicates and leaks, outliers, class balance,
calibration, unknown-image rejection), each section a small module of pure functions; :mod:`.step` runs them and
writes the page with :mod:`pipeline.reports.html`."""


class Skipped(Exception):
    """A section that cannot run on this cache; its message (one line) says why and what to do."""
