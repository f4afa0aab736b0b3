"""The house's layers, read from every module's imports, and what the distribution installs.

From the bottom: ``eval_artifacts.study`` (the config, the levels, the errors) imports nothing else of
ours; ``eval_artifacts`` imports neither ``training`` nor ``hub_tools``; ``training`` never imports
``hub_tools``; ``hub_tools`` imports ``training`` only in ``cli.py`` and ``pipeline.py``, the two places
that chain the stages.
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest
import tomllib
from helpers import imported_names

ROOT = Path(__file__).resolve().parents[1]
OURS = ("eval_artifacts", "training", "hub_tools", "cards_templates", "configs", "bench")
PACKAGES = {"eval_artifacts", "training", "hub_tools", "cards_templates"}


def imports_of(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at any depth (function-level imports included)."""
    return {name for name in imported_names(path) if name.split(".")[0] in OURS}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def offenders(package: str, allowed) -> dict[str, list[str]]:
    found = {}
    for path in modules(package):
        bad = sorted(name for name in imports_of(path) if not allowed(path, name))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def test_the_study_layer_imports_nothing_else_of_ours():
    assert modules("eval_artifacts.study")
    assert offenders("eval_artifacts.study", lambda path, name: name.startswith("eval_artifacts.study")) == {}


def test_eval_artifacts_imports_neither_training_nor_hub_tools():
    assert offenders("eval_artifacts", lambda path, name: name.startswith("eval_artifacts")) == {}


def test_training_never_imports_hub_tools():
    assert offenders("training", lambda path, name: not name.startswith("hub_tools")) == {}


def test_hub_tools_imports_training_only_where_stages_are_chained():
    def allowed(path: Path, name: str) -> bool:
        return not name.startswith("training") or path.name in ("cli.py", "pipeline.py")

    assert offenders("hub_tools", allowed) == {}
    # Not vacuous: the two chaining modules do import the stages.
    assert any(name.startswith("training") for name in imports_of(ROOT / "hub_tools" / "pipeline.py"))


def test_the_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from training.sft import run\n    import hub_tools.cli\n")
    assert imports_of(module) == {"training.sft", "training.sft.run", "hub_tools.cli"}


def test_the_distribution_installs_only_the_projects_four_packages():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {name.split(".")[0] for name in setuptools["packages"]} == PACKAGES


def test_every_package_of_ours_is_listed_for_installation():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for package in PACKAGES
        for init in (ROOT / package).rglob("__init__.py")
    }
    listed = set(setuptools["packages"]) - set(setuptools["package-dir"])
    assert on_disk == listed


def test_a_built_wheel_holds_only_the_four_packages_and_the_configs(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building a wheel offline needs setuptools in this environment")
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("cot_compress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == PACKAGES
    assert {
        "eval_artifacts/study/configs/tiny.yaml",
        "eval_artifacts/study/configs/qwen3-4b-gsm8k.yaml",
    } <= set(names)
