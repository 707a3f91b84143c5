"""``python -m pipeline <step> [--option value | OPTION=value ...]``: an argparse parser built from each step's
config dataclass, so make variables (``make head HEAD=svm``) and CLI flags are the same names."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import shlex
import shutil
import sys

from pipeline import quiet, records, steps
from pipeline.errors import PipelineError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

OUTPUTS = ("cache_dir", "models_dir", "reports_dir", "output", "out")  # options naming what a step writes
PATH_OPTIONS = OUTPUTS + ("cache", "model", "data", "weights", "keras_home")  # what an OSError is traced to
ASSIGN = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)=(.*)$", re.S)
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _steps():

    return steps.STEPS


def _bool(name, text):
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise PipelineError(f"{name.upper()}={text!r}: expected 0 or 1")


def _typed(kind, name):
    def convert(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name.upper()}={text!r}: expected {kind.__name__}") from None

    convert.__name__ = kind.__name__
    return convert


def parser(name, step) -> argparse.ArgumentParser:
    """The step's argparse parser: one ``--field-name`` per config field (``--x/--no-x`` for booleans), help
    from the field's metadata, and the bare arguments of a step that takes them."""
    p = argparse.ArgumentParser(prog=f"python -m pipeline {name}", description=step.help, epilog=step.extra or None,
                                allow_abbrev=False, exit_on_error=False,
                                usage=f"python -m pipeline {name} [--option value | OPTION=value ...]"
                                      + (f" [{step.positional.upper()} ...]" if step.positional else ""))
    for f in dataclasses.fields(step.config) if step.config else ():
        flag, helptext = "--" + f.name.replace("_", "-"), f"{f.metadata.get('help', '')} ({f.name.upper()}=, default %(default)r)"
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
        else:
            p.add_argument(flag, dest=f.name, type=_typed(type(f.default), f.name), default=f.default,
                           metavar=f.name.upper(), help=helptext)
    if step.positional:
        p.add_argument("_bare", nargs="*", metavar=step.positional.upper(), help="added to " + step.positional.upper())
    return p


def _normalise(step_name, step, argv):
    """(argparse arguments, extra): ``NAME=value`` and ``--name value`` of a config field become its flag
    (booleans ``--name``/``--no-name``); other names are the step's free options, or an error."""
    fields = {f.name: f for f in dataclasses.fields(step.config)} if step.config else {}
    out, extra, it = [], {}, iter(argv)
    for arg in it:
        m = ASSIGN.match(arg)
        if arg.startswith("--") and len(arg) > 2:
            name, has_value, val = arg[2:].partition("=")
            key = name.replace("-", "_").lower()
            if key.startswith("no_") and key[3:] in fields and isinstance(fields[key[3:]].default, bool):
                out.append(arg)
                continue
            if not has_value:
                if key in fields and isinstance(fields[key].default, bool):
                    nxt = next(it, None)
                    if nxt is None or nxt.lower() not in TRUE + FALSE:
                        out.append(arg)
                        if nxt is not None:
                            out.append(nxt)
                        continue
                    val = nxt
                else:
                    val = next(it, None)
                    if val is None:
                        raise PipelineError(f"option --{name} needs a value")
        elif m:
            name, val = m.group(1), m.group(2)
            key = name.lower()
        else:
            if not step.positional:
                raise PipelineError(f"{step_name}: unexpected argument {arg!r}; options are --name value or NAME=value")
            out.append(arg)
            continue
        if key in fields:
            f = fields[key]
            flag = "--" + f.name.replace("_", "-")
            if isinstance(f.default, bool):
                out.append(flag if _bool(name, val) else "--no-" + f.name.replace("_", "-"))
            else:
                out.append(f"{flag}={val}")
        elif step.extra:
            extra[name] = val
        else:
            valid = ", ".join(n.upper() for n in fields) or "none"
            raise PipelineError(f"{step_name}: unknown option {name!r}; valid: {valid}")
    return out, extra


def parse(step_name, step, argv):
    """(config, extra) from ``--name value``, ``--name=value`` and ``NAME=value`` arguments."""
    args, extra = _normalise(step_name, step, argv)
    try:
        ns = parser(step_name, step).parse_args(args)
    except argparse.ArgumentError as e:
        raise PipelineError(e.message) from None
    values = vars(ns)
    bare = values.pop("_bare", [])
    if bare:
        values[step.positional] = " ".join(filter(None, [values.get(step.positional, ""), shlex.join(bare)]))
    cfg = step.config(**values) if step.config else None
    return cfg, extra


def _help(steps):
    lines = ["usage: python -m pipeline <step> [OPTION=value ...]  (python -m pipeline <step> --help)", "",
             "steps:"]
    lines += [f"  {n:<10} {s.help}" for n, s in steps.items()]
    return "\n".join(lines)


def _inside(path, folder) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def os_error(e: OSError, cfg=None) -> str:
    """One line for an OSError: the file or folder it is about and the option that named it (the option whose
    path holds it; without a file, on a full disk, the output folders that have no room left), and why."""
    named = [(f.name.upper(), getattr(cfg, f.name)) for f in (dataclasses.fields(cfg) if cfg else ())
             if f.name in PATH_OPTIONS and isinstance(getattr(cfg, f.name), str) and getattr(cfg, f.name)]
    named.sort(key=lambda nv: PATH_OPTIONS.index(nv[0].lower()))
    why = e.strerror or str(e)
    if e.filename:
        option = next((f" ({n}={v})" for n, v in named if _inside(str(e.filename), v)), "")
        return f"{e.filename}: {why}{option}"
    if e.errno == errno.ENOSPC:
        full = [f"{n}={v}" for n, v in named if n.lower() in OUTPUTS
                and _free(v if n.endswith("_DIR") else os.path.dirname(os.path.abspath(v))) < (1 << 20)]
        if full:
            return f"{why}: no room left in {', '.join(full)}; free space there or name another folder"
    return why


def _free(folder) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = _steps()
    cfg = None
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help(steps))
        return 0
    name, rest = argv[0], argv[1:]
    try:
        if name not in steps:
            raise PipelineError(f"unknown step {name!r}; valid: {', '.join(steps)}")
        step = steps[name]
        if "-h" in rest or "--help" in rest:
            parser(name, step).print_help()
            return 0
        cfg, extra = parse(name, step, rest)
        if getattr(cfg, "keras_home", ""):

            records.use_keras_home(cfg.keras_home)  # before Keras is imported: Keras reads it once
        if step.tensorflow:

            quiet.tensorflow()
        return int(step.load()(cfg, extra) or 0)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error(e, cfg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def run() -> None:
    """``python -m pipeline``: :func:`main`, its status the process' exit status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
