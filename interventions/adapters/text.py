"""Text-only causal language models (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...): no vision tower.

They serve plain chat and the interventions that need no image (VHR with fixed ``heads``); a request with an
image, or a method that reads image tokens, is refused naming the field. The same model runs on both engines,
which is what the vLLM path's CPU parity tests use (``service/vllm``).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from seeright.interventions.adapters.base import ChatTurn, ModelAdapter, Segment
from seeright.interventions.adapters.llava import chatml_segments, default_system

QUERY_SENTINEL = "\x00seeright-query\x00"


class TextAdapter(ModelAdapter):
    """The tokenizer's chat template (ChatML, any other template, or ``USER: ... ASSISTANT:`` without one)."""

    family = "text"

    @classmethod
    def matches(cls, config: Any) -> bool:
        return getattr(config, "vision_config", None) is None and (
            getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            or any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or [])
        )

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model

    @property
    def image_token_id(self) -> int:
        return -1  # no token id is negative: no prompt token is an image token

    def image_token_text(self) -> str:
        return ""

    def check_image(self, image: Image.Image) -> None:
        raise ValueError("the model is text-only (no vision tower)")

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        raise ValueError("the model is text-only (no vision tower)")

    def segments(self, turns: list[ChatTurn]) -> list[Segment]:
        template = self.tokenizer.chat_template or ""
        if "<|im_start|>" in template:
            return chatml_segments(turns, "", default_system(template))
        last_user = max(i for i, t in enumerate(turns) if t.role == "user")
        if template:  # any other template: render it around a sentinel query and cut there
            messages = [{"role": t.role, "content": QUERY_SENTINEL if i == last_user else t.text} for i, t in enumerate(turns)]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            before, after = text.split(QUERY_SENTINEL)
            return [Segment(before), Segment(turns[last_user].text, "query"), Segment(after)]
        out: list[Segment] = []
        for i, turn in enumerate(turns):
            if turn.role != "system":
                out.append(Segment(turn.role.upper() + ": "))
            out.append(Segment(turn.text, "query" if i == last_user else "text"))
            out.append(Segment(" "))
        out.append(Segment("ASSISTANT:"))
        return out
