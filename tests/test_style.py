"""The house style, checked: lines under 110 characters everywhere, library modules under ~400
lines and functions under ~50 (a few lines of slack, so that a docstring line does not fail CI)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("moe_jax", "configs", "experiments", "tests", "notebooks", "benchmarks")
                 for p in (ROOT / d).rglob("*.py") if "workdirs" not in p.parts)
LIBRARY = [p for p in SOURCES if p.parts[len(ROOT.parts)] == "moe_jax"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_lines_are_at_most_110_characters(path):
    long = [i for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 110]
    assert not long, f"{path.relative_to(ROOT)}: lines {long} are over 110 characters"


def test_library_modules_and_functions_are_short():
    too_long = []
    for path in LIBRARY:
        source = path.read_text()
        if len(source.splitlines()) > 410:
            too_long.append(f"{path.relative_to(ROOT)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 56:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)
