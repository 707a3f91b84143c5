"""The package's own rules, checked on its source: small modules and functions, private Keras/TensorFlow names in
one module only, no process tricks."""

from __future__ import annotations

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pipeline"
MODULES = sorted(PACKAGE.rglob("*.py"))
INTERNALS = PACKAGE / "keras_internals.py"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 60
TRICKS = re.compile(r"os\._exit|\bfork\b|SCHED_IDLE|sched_setscheduler|setpriority|os\.nice\(|waitpid")


def _rel(path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _tree(path):
    return ast.parse(path.read_text(), filename=str(path))


def test_every_module_is_at_most_300_lines():
    long = [f"{_rel(p)} ({n})" for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {', '.join(long)}"


def test_every_function_is_at_most_60_lines():
    long = []
    for p in MODULES:
        for node in ast.walk(_tree(p)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{_rel(p)}:{node.lineno} {node.name} ({n})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def _private_uses(path):
    """Leading-underscore attributes of objects other than self/cls, and imports of keras.src / tensorflow.python."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                yield f"{_rel(path)}:{node.lineno} .{node.attr}"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                if name.startswith(("keras.src", "tensorflow.python")):
                    yield f"{_rel(path)}:{node.lineno} import {name}"


def test_private_keras_and_tensorflow_names_live_in_one_module():
    assert INTERNALS.exists(), f"{_rel(INTERNALS)} is missing"
    found = [use for p in MODULES if p != INTERNALS for use in _private_uses(p)]
    assert not found, f"private names outside {_rel(INTERNALS)}: {', '.join(found)}"


def test_no_process_tricks():
    found = [f"{_rel(p)}:{i}: {line.strip()}" for p in MODULES
             for i, line in enumerate(p.read_text().splitlines(), 1) if TRICKS.search(line)]
    assert not found, "process tricks: " + "; ".join(found)


def test_no_environment_test_hooks():
    """Production code reads no PIPELINE_* variable meant for tests (faults are injected by the tests themselves);
    the two it reads are the assets folder and showing TensorFlow's start-up log."""
    allowed = {"PIPELINE_SHARED", "PIPELINE_TF_LOGS"}
    found = {f"{_rel(p)}: {m}" for p in MODULES for m in re.findall(r"PIPELINE_[A-Z_]+", p.read_text())
             if m not in allowed}
    assert not found, "environment hooks: " + ", ".join(sorted(found))


LAYERS = ("data", "backbones", "cache", "reports", "heads", "finetune", "serve", "bench")  # the data's way


def _layer(module: str):
    """Where ``module`` (dotted) stands on the data's way: -1 the utilities at the top of the package (errors,
    records, configs, ...), then LAYERS in order, the CLI last; None outside the package."""
    parts = module.split(".")
    if parts[0] != "pipeline":
        return None
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return len(LAYERS) if len(parts) > 1 and parts[1] in ("cli", "steps", "__main__") else -1


def test_imports_run_down_the_data_way_only():
    """A package imports only packages before it (data -> backbones -> cache -> reports -> heads -> finetune ->
    serve -> bench); the utilities import none of them; only the API (``pipeline/__init__``) and the CLI sit on
    top of everything."""
    up = []
    for p in MODULES:
        module = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module == "pipeline.__init__":
            continue
        me = _layer(module)
        for node in ast.walk(_tree(p)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"pipeline.{a.name}" for a in node.names if node.module == "pipeline"]
            up += [f"{_rel(p)}:{node.lineno} -> {n}" for n in names if _layer(n) is not None and _layer(n) > me]
    assert not up, "imports up the data's way: " + ", ".join(up)


def test_a_module_that_imports_inside_functions_says_why():
    """Imports sit at a module's top; a module that imports inside its functions (to keep TensorFlow, Keras,
    scikit-learn or an optional runtime out of commands that do not need them) says so, with the word lazily."""
    silent = []
    for p in MODULES:
        tree = _tree(p)
        inner = [n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]
        if inner and "lazily" not in p.read_text():
            silent.append(f"{_rel(p)}:{min(inner)}")
    assert not silent, "imports inside functions without a word on why: " + ", ".join(silent)
