"""Results as data: every measurement command writes one JSON record, and the docs' tables are rendered from them.

A record is ``results/<kind>/<date>-<name>.json`` holding what was measured (``values``: the command's own JSON
output, unchanged), the command line that measured it, the commit it ran on (and whether the tree had
uncommitted changes), the machine and the date. A rerun is a new record; :mod:`seeright.tools.render` renders the
newest record of each table into the docs, and ``seeright results check`` (run by the test suite) fails when a
rendered table and its record disagree. Where the code runs from a copy without git (a tree copied to a GPU
machine), ``SEERIGHT_SOURCE_COMMIT`` names the commit the copy was made from, and ``dirty`` is unknown (``None``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("results")
KINDS = ("bench", "bench-serving", "bench-vllm", "loadtest", "hostile", "eval-shapes", "lmms-pope", "lookback-lens", "agser", "vif-chain", "tune-defaults", "score", "engine-agreement")


@dataclass(frozen=True)
class Record:
    """One measurement: what, by which command, on which commit and machine, when."""

    kind: str
    name: str
    values: Any
    command: str
    commit: str | None
    dirty: bool | None
    machine: dict[str, Any]
    date: str
    path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "command": self.command, "commit": self.commit,
                "dirty": self.dirty, "machine": self.machine, "date": self.date, "values": self.values}

    def caption(self) -> str:
        """One line under a rendered table: the command, the commit, the machine and the date."""
        mark = {True: " + local changes", None: " (a copy of its tree)"}.get(self.dirty, "")
        commit = "no commit" if self.commit is None else self.commit[:10] + mark
        m = self.machine
        where = f"{m.get('cpu') or m.get('machine')}, {m.get('cores')} cores" + (f", {m['gpu']}" if m.get("gpu") else "")
        return f"`{self.command}` · {commit} · {where} · {self.date[:10]}"


def machine() -> dict[str, Any]:
    """What a figure depends on: processor, cores, memory, accelerator, Python and the core packages."""
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(), "cores": os.cpu_count(),
                            "python": platform.python_version(), "cpu": _cpu_name()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for package in ("torch", "transformers", "vllm"):
        module = sys.modules.get(package)
        if module is not None:
            info[package] = getattr(module, "__version__", None)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write(kind: str, name: str, values: Any, argv: Sequence[str], out: Path | str = RESULTS_DIR) -> Path:
    """Write ``values`` as a new record of ``kind`` under ``out`` and return its path."""
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    record = Record(kind, name, values, "seeright " + " ".join(argv) if argv and argv[0] != "python" else " ".join(argv),
                    commit or os.environ.get("SEERIGHT_SOURCE_COMMIT"), dirty,
                    machine(), datetime.now(timezone.utc).isoformat(timespec="seconds"))
    folder = Path(out) / kind
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record.date[:19].replace(':', '')}-{_slug(name)}.json"
    path.write_text(json.dumps(record.to_json(), indent=1, default=str) + "\n")
    return path


def load(path: Path | str) -> Record:
    data = json.loads(Path(path).read_text())
    return Record(data["kind"], data["name"], data["values"], data["command"], data["commit"], data["dirty"],
                  data["machine"], data["date"], Path(path))


def newest(kind: str, name: str, root: Path | str = RESULTS_DIR) -> Record:
    """The newest record of ``kind`` named ``name`` (a rerun supersedes what it measured again)."""
    found = [load(p) for p in sorted((Path(root) / kind).glob("*.json"))]
    found = [r for r in found if r.name == name]
    if not found:
        raise FileNotFoundError(f"no record of {kind} named {name!r} under {root}")
    return max(found, key=lambda r: r.date)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "record"
