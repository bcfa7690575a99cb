"""The package layout: one importable name, ``seeright``, that no folder of a user's can shadow, and modules that
import each other one way only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("service", "interventions", "eval", "configs", "model_zoo", "testbed", "tools")


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter started in ``cwd`` (which Python puts first on the import path)."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_users_own_folders_do_not_shadow_seeright(tmp_path: Path) -> None:
    # a training repo's usual folders, each a package that breaks loudly if imported
    for name in ("configs", "tools", "eval", "service"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    (tmp_path / "configs" / "models").mkdir()  # what shadowed seeright's model configs before
    answer = _run(
        "from seeright.service.engine import Engine\n"
        "out = Engine.from_pretrained('tiny-random/llava').generate('Describe the image.', max_new_tokens=4)\n"
        "print(out.token_ids)\n",
        tmp_path,
    )
    assert answer.returncode == 0, answer.stderr
    assert len(eval(answer.stdout.strip().splitlines()[-1])) == 4


@pytest.mark.parametrize("room", ROOMS)
def test_only_seeright_is_importable(tmp_path: Path, room: str) -> None:
    found = _run(f"import {room}", tmp_path)
    assert found.returncode != 0 and "ModuleNotFoundError" in found.stderr, f"`import {room}` found something"
    assert _run(f"import seeright.{room}", tmp_path).returncode == 0


def _module_name(path: Path) -> str:
    """``service/api/app.py`` -> ``seeright.service.api.app`` (the folders are mapped under ``seeright``)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts if parts[0] == "seeright" else ("seeright", *parts))


def _imports() -> dict[str, set[str]]:
    """Every seeright module and the seeright modules it imports anywhere in its body (lazy imports too)."""
    graph: dict[str, set[str]] = {}
    for room in (*ROOMS, "seeright"):
        for path in (ROOT / room).rglob("*.py"):
            deps = graph.setdefault(_module_name(path), set())
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seeright."):
                    deps.add(node.module)
                    deps.update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.startswith("seeright."))
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_module_imports_back_up_the_path() -> None:
    graph = _imports()
    cycles = []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [module, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_rooms_depend_downwards() -> None:
    """``interventions`` imports no other room; ``eval`` never imports ``service``; only the CLI, ``tools`` and
    ``testbed`` sit above the service."""
    room_of = lambda name: name.split(".")[1] if "." in name else "seeright"  # noqa: E731
    for module, deps in _imports().items():
        room = room_of(module)
        for dep in deps:
            other = room_of(dep)
            if room == "interventions":
                assert other == "interventions", f"{module} imports {dep}"
            if room in ("eval", "service", "model_zoo", "configs"):
                assert other not in ("cli", "tools", "testbed"), f"{module} imports {dep}"
            if room == "eval":
                assert other != "service", f"{module} imports {dep}"
