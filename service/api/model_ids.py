"""Model ids a request may name: the served model or a LoRA adapter, each with ``+preset`` suffixes."""

from __future__ import annotations

from collections.abc import Collection

from fastapi import HTTPException


def split_model(name: str, served: str, adapters: Collection[str] = ()) -> tuple[str | None, list[str]]:
    """``served+preset+preset`` or ``ADAPTER+preset`` -> the LoRA adapter (None: the base model) and the presets;
    404 naming ``model`` for a model this server does not serve."""
    base, *presets = name.split("+")
    if base != served and base not in adapters:
        also = f" and the adapters {sorted(adapters)}" if adapters else ""
        raise HTTPException(404, f"model: {base!r} is not served here; this server serves {served!r}{also}")
    return (None if base == served else base), presets
