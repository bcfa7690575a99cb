"""MkDocs hook: lay out the ``seeright`` package's sources as installed (``pyproject.toml``'s ``package-dir``
mapping) under ``build/docs-src``, so that mkdocstrings finds ``seeright.service`` & co. without an install (an
editable install maps them in an import hook, which static analysis does not run)."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TREE = ROOT / "build" / "docs-src"


def _sources_only(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if not n.endswith(".py") and not (Path(folder) / n).is_dir() or n == "__pycache__"]


def lay_out() -> None:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(TREE, ignore_errors=True)
    for package, folder in sorted(mapping.items()):  # "seeright" first, its rooms after
        target = TREE.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, ignore=_sources_only, dirs_exist_ok=True)


# At import, when MkDocs reads its configuration: mkdocstrings sets its search paths in its own ``on_config``, which
# runs before a hook's, and skips a folder that does not exist yet (a fresh checkout).
lay_out()


def on_config(config: Any) -> Any:
    lay_out()  # again for ``mkdocs serve``'s rebuilds: the sources may have changed
    return config
