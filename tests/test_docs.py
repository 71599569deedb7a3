"""The manual builds, strictly and offline, and says what the code does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from components.paths import REPO_ROOT
from components.settings import Settings


def test_the_manual_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link or anchor, or a page left out of the
    navigation, fails the build."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "serving" / "index.html").is_file()


def test_the_readme_links_to_pages_that_exist() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 10
    assert [link for link in links if not (REPO_ROOT / link).is_file()] == []


def test_every_environment_variable_is_documented() -> None:
    page = (REPO_ROOT / "docs" / "configuration.md").read_text()
    variables = [str(field.validation_alias) for field in Settings.model_fields.values()]
    assert len(variables) >= 15
    assert [v for v in variables if f"`{v}`" not in page] == []
