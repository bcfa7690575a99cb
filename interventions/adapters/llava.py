"""LLaVA-1.5 as in llava-hf (`LlavaForConditionalGeneration`): CLIP tower, MLP projector, Llama decoder."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from interventions.adapters.base import ChatTurn, ModelAdapter, Segment


class LlavaAdapter(ModelAdapter):
    """llava-hf template: ``USER: <image>\\n{text} ASSISTANT:``; 576 image tokens (24x24) for LLaVA-1.5."""

    family = "llava"

    @classmethod
    def matches(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) == "llava"

    def image_token_text(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    @property
    def grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def image_tokens_per_image(self) -> int:
        rows, cols = self.grid
        full = self.model.config.vision_feature_select_strategy == "full"
        return rows * cols + int(full)

    def segments(self, turns: list[ChatTurn]) -> list[Segment]:
        # Mirrors the llava-hf chat template: system text bare, "ROLE: ", images first, then text + " ".
        last_user = max(i for i, t in enumerate(turns) if t.role == "user")
        out: list[Segment] = []
        for i, turn in enumerate(turns):
            if turn.role != "system":
                out.append(Segment(turn.role.upper() + ": "))
            out.extend(Segment(self.image_token_text() + "\n", "image") for _ in range(turn.num_images))
            out.append(Segment(turn.text, "query" if i == last_user else "text"))
            out.append(Segment(" "))
        out.append(Segment("ASSISTANT:"))
        return out

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        if self.image_tokens_per_image() != self.grid[0] * self.grid[1]:
            raise ValueError("vision_feature_select_strategy='full' adds a CLS token that has no grid cell")
        pixels = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels}, [self.grid] * len(images)
