"""``python -m pipeline <step> [--option value | OPTION=value ...]``: options are built from each step's
config dataclass, so make variables (``make head HEAD=svm``) and CLI flags are the same names."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys

from pipeline.errors import PipelineError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclasses.dataclass(frozen=True)
class Step:
    help: str
    config: type | None
    run: callable  # run(cfg, extra: dict) -> int | None
    extra: str = ""  # what free NAME=value options mean for this step ("" = none allowed)
    positional: str = ""  # config field (str) that bare arguments are added to, shell-quoted ("" = none)


def _steps():
    from pipeline import commands

    return commands.STEPS


ASSIGN = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)=(.*)$", re.S)


def _parse_value(field, text):
    kind = type(field.default)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(text)
    return kind(text)


def parse(step_name, step, argv):
    """(config, extra) from ``--name value``, ``--name=value`` and ``NAME=value`` arguments."""
    fields = {f.name: f for f in dataclasses.fields(step.config)} if step.config else {}
    values, extra, bare, it = {}, {}, [], iter(argv)
    for arg in it:
        m = ASSIGN.match(arg)
        if arg.startswith("--"):
            name, _, val = arg[2:].partition("=")
            if not _:
                val = next(it, None)
                if val is None:
                    raise PipelineError(f"option --{name} needs a value")
            name = name.replace("-", "_")
        elif m:
            name, val = m.group(1), m.group(2)
        elif step.positional:
            bare.append(arg)
            continue
        else:
            raise PipelineError(f"{step_name}: unexpected argument {arg!r}; options are --name value or NAME=value")
        key = name.lower()
        if key in fields:
            try:
                values[key] = _parse_value(fields[key], val)
            except ValueError:
                raise PipelineError(f"{name.upper()}={val!r}: expected {type(fields[key].default).__name__}") \
                    from None
        elif step.extra:
            extra[name] = val
        else:
            valid = ", ".join(n.upper() for n in fields) or "none"
            raise PipelineError(f"{step_name}: unknown option {name!r}; valid: {valid}")
    if bare:
        values[step.positional] = " ".join(filter(None, [values.get(step.positional, ""), shlex.join(bare)]))
    cfg = step.config(**values) if step.config else None
    return cfg, extra


def _help(steps, name=None):
    if name is None:
        lines = ["usage: python -m pipeline <step> [OPTION=value ...]  (python -m pipeline <step> --help)", "",
                 "steps:"]
        lines += [f"  {n:<10} {s.help}" for n, s in steps.items()]
        return "\n".join(lines)
    step = steps[name]
    bare = f" [{step.positional.upper()} ...]" if step.positional else ""
    lines = [f"usage: python -m pipeline {name} [--option value | OPTION=value ...]{bare}", "", step.help, ""]
    if step.config:
        lines.append("options (make variable, default, meaning):")
        for f in dataclasses.fields(step.config):
            lines.append(f"  --{f.name.replace('_', '-'):<16} {f.name.upper():<16} {f.default!r:<22} "
                         f"{f.metadata.get('help', '')}")
    if step.extra:
        lines += ["", step.extra]
    return "\n".join(lines)


def _import_tensorflow_quietly():
    """TensorFlow's C++ start-up lines ("Could not find cuda drivers", ...) reach fd 2 before any log level
    applies: hold them back, and show them only when the import fails (PIPELINE_TF_LOGS=1 shows them)."""
    if "tensorflow" in sys.modules or os.environ.get("PIPELINE_TF_LOGS"):
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = _steps()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help(steps))
        return 0
    name, rest = argv[0], argv[1:]
    try:
        if name not in steps:
            raise PipelineError(f"unknown step {name!r}; valid: {', '.join(steps)}")
        if "-h" in rest or "--help" in rest:
            print(_help(steps, name))
            return 0
        cfg, extra = parse(name, steps[name], rest)
        if steps[name].config is not None:
            _import_tensorflow_quietly()
        return int(steps[name].run(cfg, extra) or 0)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
