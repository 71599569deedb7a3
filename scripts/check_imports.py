"""Lint: the project's own modules are imported at the top of a file.

An import of a project module inside a function hides a dependency (and often a circle) from
the reader and from `lint-imports`' picture of the layers, so it is allowed only under a
comment that says why (above it, or above the block of imports it belongs to). Heavy
third-party libraries such as torch may still load lazily: this check is about the project's
own packages.

    python -m scripts.check_imports [PATH ...]     # what `make lint` runs; exit 1 on a finding
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PROJECT = ("components", "flows", "service", "scripts", "benchmarks")


def lazy_project_imports(path: Path) -> list[str]:
    """`path:line: import` for each import of a project module inside a function that no
    comment explains."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                modules = [inner.module]
            elif isinstance(inner, ast.Import):
                modules = [alias.name for alias in inner.names]
            else:
                continue
            if not any(m.split(".")[0] in PROJECT for m in modules):
                continue
            above = inner.lineno - 2
            while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
                above -= 1  # the block of imports this one belongs to
            if above < 0 or not lines[above].strip().startswith("#"):
                found.append(f"{path}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    return sorted(set(found))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path(p) for p in PROJECT])
    args = parser.parse_args(argv)
    files = sorted(f for p in args.paths for f in (p.rglob("*.py") if p.is_dir() else [p]))
    findings = [line for f in files for line in lazy_project_imports(f)]
    for line in findings:
        print(f"{line}  <- move it to the top of the file, or say why above it")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
