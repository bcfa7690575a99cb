"""The method registry: the single place that knows which interventions exist.

Built-in methods are found by importing every module of ``seeright.interventions.methods`` and taking the
:class:`~seeright.interventions.methods.base.Method` subclasses defined there; methods from other packages plug in
through the ``seeright.methods`` entry-point group (``[project.entry-points."seeright.methods"]`` in their
``pyproject.toml``, each pointing at a Method subclass), or are added in code with :meth:`with_methods`.
A registry is an immutable value: each engine holds its own, nothing is registered globally.

Everything that lists methods (the engine, ``/v1/models`` presets, ``/v1/interventions``, the CLI,
``seeright bench``, the load test, the testbed sweeps) asks a registry.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from seeright.interventions import methods as methods_package
from seeright.interventions.methods.base import Method, acting_order

ENTRY_POINT_GROUP = "seeright.methods"


def _builtin_classes() -> list[type[Method]]:
    found = []
    for module_info in pkgutil.iter_modules(methods_package.__path__):
        module = importlib.import_module(f"{methods_package.__name__}.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Method) and cls.__module__ == module.__name__ and "name" in vars(cls):
                found.append(cls)
    return found


def _plugin_classes() -> list[type[Method]]:
    return [ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)]


class MethodRegistry(Mapping[str, Method]):
    """Methods by name, iterated in their declared ``order`` (the order they act in one request)."""

    def __init__(self, methods: Iterable[Method]) -> None:
        ordered = sorted(methods, key=acting_order)
        names = [m.name for m in ordered]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"methods registered twice: {duplicated}")
        self._methods = {m.name: m for m in ordered}

    @classmethod
    def builtin(cls, plugins: bool = True) -> MethodRegistry:
        """The methods shipped in ``seeright.interventions.methods`` (and, with ``plugins``, the entry points)."""
        classes = _builtin_classes() + (_plugin_classes() if plugins else [])
        return cls(c() for c in classes)

    def with_methods(self, *methods: Method) -> MethodRegistry:
        """A new registry with ``methods`` added (or replacing those of the same name)."""
        replaced = {m.name for m in methods}
        return MethodRegistry([*(m for m in self._methods.values() if m.name not in replaced), *methods])

    def __getitem__(self, name: str) -> Method:
        return self._methods[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def literal(self, name: str) -> Method | None:
        """The test-only literal version of a method (its ``literal`` declaration), if it has one."""
        path = self[name].literal
        if path is None:
            return None
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)()

    def mixed_traffic(self) -> list[str]:
        """Methods that take part in the mixed loads of the benchmark and the load test."""
        return [n for n, m in self._methods.items() if m.mixed_traffic]

    def sweep(self, settings: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> list[tuple[str, dict[str, dict[str, Any]]]]:
        """``(label, interventions)`` rows of a method sweep: each method that edits at its defaults, then its
        sweep settings (labelled ``"vhr alpha=4"``): ``settings[name]`` where given (a model's), else its own."""
        settings = settings or {}
        rows = []
        for name, method in self._methods.items():
            if method.signal:  # edits nothing: its row would repeat the baseline's
                continue
            rows.append((name, {name: {}}))
            for params in settings.get(name, method.sweep):
                label = " ".join([name, *(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())])
                rows.append((label, {name: dict(params)}))
        return rows
