"""Measured shape of the code (issue 12): the library speaks in its own terms (no message
names a command-line flag: it names the option, and the CLI words it as a flag), no
function in the library or the CLI is longer than 60 lines, and no private name is
imported across modules. Static checks (ast), no model."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from onnx_dynedit.errors import InputError, option

REPO = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w`-])--[a-z][a-z-]+")
# Commands of other tools that a hint may show the user verbatim.
FOREIGN = ("ray start --head",)
MAX_FUNCTION_LINES = 60


def _strings(tree: ast.Module):
    """Every string constant of a module except docstrings, with its line."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def _sources(*roots):
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(), filename=str(path))


def test_no_library_string_names_a_flag():
    found = []
    for name, tree in _sources("onnx_dynedit"):
        for line, text in _strings(tree):
            for foreign in FOREIGN:
                text = text.replace(foreign, "")
            if FLAG.search(text):
                found.append(f"{name}:{line}: {text!r}")
    assert not found, "library strings naming a CLI flag (use errors.option):\n" + "\n".join(found)


def test_option_reads_as_a_keyword_in_python_and_as_a_flag_on_the_cli():
    from cli.common import flag_words

    err = InputError(f"{option('input_shapes')} gives input 'x' twice",
                     hint=f"use {option('device', 'cpu')}, {option('in_place', True)} or {option('max_edits', 1)}")
    assert str(err) == "input_shapes gives input 'x' twice (use device='cpu', in_place=True or max_edits=1)"
    assert err.one_line(flag_words) == ("--input-shape gives input 'x' twice; "
                                        "use --device cpu, --in-place or --max-edits 1")


def test_no_function_longer_than_60_lines():
    long = []
    for name, tree in _sources("onnx_dynedit", "cli"):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "functions longer than 60 lines:\n" + "\n".join(long)


def test_no_private_name_is_imported_across_modules():
    found = []
    for name, tree in _sources("onnx_dynedit", "cli", "benchmarks"):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                    ("onnx_dynedit", "cli", "benchmarks"))):
                found += [f"{name}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "private names imported across modules:\n" + "\n".join(found)
