"""The one exception type users see: a one-line message, no traceback."""


class PipelineError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits 2."""


def choose(name, options, what):
    """Return ``options[name]`` or fail listing the valid names."""
    try:
        return options[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(options))
        raise PipelineError(f"unknown {what} {name!r}; valid: {valid}") from None
