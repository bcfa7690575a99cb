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


def on_config(config: Any) -> Any:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(TREE, ignore_errors=True)
    for package, folder in sorted(mapping.items()):  # "seeright" first, its rooms after
        target = TREE.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, ignore=_sources_only, dirs_exist_ok=True)
    return config
