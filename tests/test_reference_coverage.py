"""Every registered rule has a paper-literal reference in tests/references and a test that
compares the library against it step by step (``check_parity``). A rule added without one fails
here, naming it."""

from __future__ import annotations

import ast
from pathlib import Path

from hfoptim.rules import RULES

TESTS = Path(__file__).resolve().parent


def parity_tests() -> list[tuple[str, set[str], set[str]]]:
    """``(test, names, references)`` for every test function that calls ``check_parity``: the
    identifiers and strings it mentions (decorators included) and the reference modules its file
    imports (``tests.references.<module>``)."""
    out = []
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        references = {
            node.module.rpartition(".")[2]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests.references.")
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            inner = list(ast.walk(node))
            calls = {n.func.id for n in inner if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            if "check_parity" not in calls:
                continue
            names = {n.attr for n in inner if isinstance(n, ast.Attribute)}
            names |= {n.id for n in inner if isinstance(n, ast.Name)}
            names |= {n.value for n in inner if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            out.append((f"{path.name}::{node.name}", names, references))
    return out


def covers(rule, names: set[str]) -> bool:
    cls = rule.class_name or rule.__name__.removesuffix("Rule")
    return cls in names or rule.__name__ in names or any(s == rule.name or s.startswith(rule.name + "_") for s in names)


def test_every_registered_rule_has_a_reference_parity_test():
    tests = parity_tests()
    assert tests, "no test calls check_parity"
    missing = [
        name for name, rule in RULES.items() if not any(covers(rule, names) and refs for _, names, refs in tests)
    ]
    assert not missing, f"rules without a reference-parity test (tests/references + check_parity): {missing}"


def test_the_coverage_check_sees_a_missing_rule():
    class Unlisted:
        name, class_name, __name__ = "unlisted", "Unlisted", "UnlistedRule"

    assert not any(covers(Unlisted, names) for _, names, _ in parity_tests())
