"""Per-model method defaults from ``configs/models/*.yaml``.

A file gives ``match`` (substrings of a model id or path, case-insensitive), the ``family`` it applies to,
``num_layers`` (the depth its layer lists are for), ``methods: {name: {param: value}}`` and, optionally,
``sweeps: {name: [{param: value}, ...]}`` (the settings the testbed tables run besides the defaults, replacing
the method's own, whose values may mean nothing at this model's scale). A request's parameters override the
model's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class ModelConfig:
    """Defaults of one model: its name, which ids it matches, and each method's default parameters."""

    name: str
    family: str | None = None
    match: tuple[str, ...] = ()
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_layers: int | None = None  # the depth its layer lists are written for; checked when a model loads
    sweeps: dict[str, tuple[dict[str, Any], ...]] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        data = yaml.safe_load(path.read_text()) or {}
        return cls(
            name=path.stem,
            family=data.get("family"),
            match=tuple(data.get("match", ())),
            methods={k: dict(v or {}) for k, v in (data.get("methods") or {}).items()},
            num_layers=data.get("num_layers"),
            sweeps={k: tuple(dict(s) for s in v or ()) for k, v in (data.get("sweeps") or {}).items()},
        )

    def check_depth(self, num_layers: int) -> None:
        """A config written for another depth would edit the wrong layers: refuse it."""
        if self.num_layers is not None and self.num_layers != num_layers:
            raise ValueError(
                f"model_config: {self.name!r} is written for a {self.num_layers}-layer model, this one has {num_layers}"
            )


GENERIC = "generic"  # no file: every default derived from the model (saved as such by ``Engine.save_pretrained``)


def builtin_configs() -> list[ModelConfig]:
    folder = resources.files("seeright.configs") / "models"
    return [ModelConfig.from_file(Path(str(p))) for p in sorted(folder.iterdir(), key=str) if p.name.endswith(".yaml")]


def find_model_config(model_id: str, family: str, choice: str | None = None) -> ModelConfig:
    """The config named (or at the path) ``choice``, else the first whose ``match`` is in ``model_id``.

    With no match, methods fall back to defaults derived from the model's depth (see each method).
    """
    configs = builtin_configs()
    if choice == GENERIC:
        return ModelConfig(name=GENERIC, family=family)
    if choice is not None:
        if Path(choice).is_file():
            return ModelConfig.from_file(Path(choice))
        for cfg in configs:
            if cfg.name == choice:
                return cfg
        raise ValueError(f"model_config: no config named {choice!r}; have {[c.name for c in configs]}")
    lowered = model_id.lower()
    for cfg in configs:
        if cfg.family in (None, family) and any(m.lower() in lowered for m in cfg.match):
            return cfg
    return ModelConfig(name=GENERIC, family=family)
