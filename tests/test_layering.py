"""The layering is checked, not hoped for: `make lint` runs import-linter's contracts
(pyproject.toml) and the top-of-file rule for project imports; each check fails on the
mistake it is there for."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.paths import REPO_ROOT
from scripts.check_imports import lazy_project_imports

PACKAGES = ("components", "flows", "service", "scripts", "benchmarks")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    executable = Path(sys.executable).parent / "lint-imports"
    return subprocess.run(
        [str(executable), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's packages and its lint configuration."""
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, tmp_path / package)
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def add_import(module: Path, line: str) -> None:
    text = module.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    module.write_text(head + sep + line + "\n" + rest)


def test_the_project_keeps_its_contracts() -> None:
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layering(tree: Path) -> None:
    add_import(tree / "components" / "records.py", "import flows.deploy  # noqa: F401")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "components/ never imports flows/" in result.stdout
    assert "components.records -> flows.deploy" in result.stdout


def test_a_new_circle_is_found(tree: Path) -> None:
    add_import(tree / "components" / "data" / "ingest.py", "import components.data.curated")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "No cycles are allowed in components.data" in result.stdout


def test_a_project_import_inside_a_function_needs_a_reason(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text(
        "def quiet():\n"
        "    from components.paths import flywheel_home\n"
        "    import components.records\n"
        "    import torch  # a heavy library may load lazily\n"
        "\n"
        "def explained():\n"
        "    # Prefect reads its settings when it is imported: after the home is set.\n"
        "    from flows.training_pipeline import training_pipeline\n"
        "    from flows.deploy import deploy\n"
    )
    found = lazy_project_imports(module)
    assert [line.split(": ", 1)[1] for line in found] == [
        "from components.paths import flywheel_home",
        "import components.records",
    ]


def test_the_project_imports_its_own_modules_at_the_top() -> None:
    found = [
        line
        for p in PACKAGES
        for f in (REPO_ROOT / p).rglob("*.py")
        for line in lazy_project_imports(f)
    ]
    assert found == []
