"""Hypothesis strategies for valid method parameters, read from each method's pydantic parameter model.

Nothing here names a method: a field's type and bounds say what to draw. Layer lists (``list[int]`` fields
whose name ends in ``layers``) are non-empty subsets of the model's layers (of the vision tower's, for fields
marked ``x-layers-of: vision``, whose integer fields are layer indices too); other integer lists (sink dims)
stay at the model's default; unbounded floats are drawn around the model's default; long generations
(``collect_tokens``, ``pgd_steps``) are kept short so that hundreds of draws fit in CI time.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from hypothesis import strategies as st
from pydantic.fields import FieldInfo

from seeright.interventions.methods.base import Method

MAX_PASS_STEPS = 4  # CARVE's collection tokens, VE masking's PGD steps: drawn always, never above this
PASS_STEPS = ("collect_tokens", "pgd_steps")


def _bounds(info: FieldInfo) -> dict[str, float]:
    out = {}
    for meta in info.metadata:
        for key in ("ge", "gt", "le", "lt"):
            value = getattr(meta, key, None)
            if value is not None:
                out[key] = value
    return out


def _core(annotation: Any) -> tuple[Any, bool]:
    """The annotation without ``| None``, and whether None was allowed."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def field_strategy(
    name: str, info: FieldInfo, default: Any, num_layers: int, vision_layers: int = 0
) -> st.SearchStrategy | None:
    """A strategy for one field, or ``None`` to leave it at the model's default."""
    kind, _ = _core(info.annotation)
    if (info.json_schema_extra or {}).get("x-layers-of") == "vision":
        if kind is int:
            return st.integers(0, vision_layers - 1)
        num_layers = vision_layers
    origin = typing.get_origin(kind)
    if origin is Literal:
        return st.sampled_from(typing.get_args(kind))
    if kind is bool:
        return st.booleans()
    if origin is list and typing.get_args(kind) == (int,):
        if not name.endswith("layers"):
            return None
        return st.lists(st.integers(0, num_layers - 1), min_size=1, max_size=num_layers, unique=True).map(sorted)
    bounds = _bounds(info)
    if kind is int:
        low, high = bounds.get("ge", bounds.get("gt", 0)), bounds.get("le", 64)
        if name in PASS_STEPS:
            high = min(high, MAX_PASS_STEPS)
        return st.integers(int(low), int(high))
    if kind is float:
        if default is None and info.default is None:  # an optional alternative (VE masking's mask_ratio)
            low, high = bounds.get("ge", bounds.get("gt", 0.5)), bounds.get("le", bounds.get("lt", 3.0))
            return st.none() | st.floats(low, high, exclude_min="gt" in bounds, exclude_max="lt" in bounds, allow_nan=False)
        centre = float(default if default is not None else info.default)
        low = bounds.get("ge", bounds.get("gt", centre / 4))
        high = bounds.get("le", bounds.get("lt", centre * 2))
        if "le" not in bounds and "lt" not in bounds:
            low, high = max(low, centre / 4), centre * 2
        return st.floats(low, high, exclude_min="gt" in bounds and low == bounds["gt"],
                         exclude_max="lt" in bounds and high == bounds["lt"], allow_nan=False)
    return None


@st.composite
def method_params(
    draw: st.DrawFn, method: Method, defaults: dict[str, Any], num_layers: int, vision_layers: int = 0
) -> dict[str, Any]:
    """A random subset of a method's fields, each with a random valid value."""
    params = {}
    for name, info in method.params_model.model_fields.items():
        strategy = field_strategy(name, info, defaults.get(name), num_layers, vision_layers)
        if strategy is not None and (name in PASS_STEPS or draw(st.booleans())):  # never a default's 200 PGD steps
            params[name] = draw(strategy)
    return params
