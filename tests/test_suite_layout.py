"""The test suite's own layering: test modules share code only through tests/helpers.py, hubtools.py,
fixtures_artifacts.py (plain functions) and conftest.py (fixtures), never by importing one another.

Importing a test module from another runs its module-level code twice under two names, re-collects its
fixtures where the importer is collected, and ties one file's tests to another's internals.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import imported_names

TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_another():
    assert len(list(TESTS.glob("test_*.py"))) > 20
    found = {}
    for path in sorted(TESTS.glob("*.py")):
        imported = sorted(name for name in imported_names(path) if name.split(".")[0].startswith("test_"))
        if imported:
            found[path.name] = imported
    assert found == {}, "move what these share into tests/helpers.py or tests/conftest.py"


def fixture_names(path: Path) -> set[str]:
    """The module-level functions of ``path`` decorated as pytest fixtures."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if ast.unparse(target) in ("pytest.fixture", "fixture"):
                    names.add(node.name)
    return names


def test_no_test_module_redefines_a_shared_fixture():
    shared = fixture_names(TESTS / "conftest.py")
    assert {"generation_base", "training_base"} <= shared
    found = {
        path.name: sorted(fixture_names(path) & shared)
        for path in sorted(TESTS.glob("test_*.py"))
        if fixture_names(path) & shared
    }
    assert found == {}, "a module fixture with a conftest fixture's name hides it: give it a name of its own"
