"""Architecture adapters, one file per family."""

from __future__ import annotations

from typing import Any

from seeright.interventions.adapters.base import ChatTurn, EncodedPrompt, ModelAdapter, ModelInfo, Segment
from seeright.interventions.adapters.llava import LlavaAdapter
from seeright.interventions.adapters.qwen2_vl import Qwen2VLAdapter
from seeright.interventions.adapters.text import TextAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaAdapter, Qwen2VLAdapter, TextAdapter)


def adapter_class_for(config: Any) -> type[ModelAdapter]:
    """The adapter class for a model config, or a ValueError naming the unsupported model type."""
    for cls in ADAPTERS:
        if cls.matches(config):
            return cls
    supported = ", ".join(a.family for a in ADAPTERS)
    raise ValueError(f"unsupported model_type {getattr(config, 'model_type', None)!r}; supported: {supported}")


__all__ = ["ADAPTERS", "ChatTurn", "EncodedPrompt", "ModelAdapter", "ModelInfo", "Segment", "TextAdapter", "adapter_class_for"]
