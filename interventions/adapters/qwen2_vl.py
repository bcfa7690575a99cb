"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution ViT with 2x2 patch merging, Qwen2 decoder with GQA and M-RoPE."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from seeright.interventions.adapters.base import ChatTurn, ModelAdapter, Segment

try:  # the PIL image processor's module (transformers >= 5), else the classic one
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
except ImportError:  # pragma: no cover
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

DEFAULT_SYSTEM = "You are a helpful assistant."


class Qwen2VLAdapter(ModelAdapter):
    """Qwen chat template; image tokens ``<|image_pad|>`` between ``<|vision_start|>`` and ``<|vision_end|>``."""

    family = "qwen2_vl"

    @classmethod
    def matches(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) in {"qwen2_vl", "qwen2_5_vl"}

    def image_token_text(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    @property
    def vision_blocks(self) -> list[torch.nn.Module]:
        return list(self.model.model.visual.blocks)

    def segments(self, turns: list[ChatTurn]) -> list[Segment]:
        last_user = max(i for i, t in enumerate(turns) if t.role == "user")
        out: list[Segment] = []
        if turns[0].role != "system":
            out.append(Segment(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"))
        for i, turn in enumerate(turns):
            out.append(Segment(f"<|im_start|>{turn.role}\n"))
            pad = self.image_token_text()
            out.extend(Segment(f"<|vision_start|>{pad}<|vision_end|>", "image") for _ in range(turn.num_images))
            out.append(Segment(turn.text, "query" if i == last_user else "text"))
            out.append(Segment("<|im_end|>\n"))
        out.append(Segment("<|im_start|>assistant\n"))
        return out

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        out = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")
        merge = self.model.config.vision_config.spatial_merge_size
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in out["image_grid_thw"].tolist()]
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, grids

    def _target_size(self, image: Image.Image, max_pixels: int | None = None) -> tuple[int, int]:
        """``(height, width)`` the processor resizes to: multiples of patch x merge within the pixel bounds."""
        p = self.image_processor
        bounds = p.size
        return smart_resize(
            image.height, image.width, factor=p.patch_size * p.merge_size, min_pixels=bounds["shortest_edge"],
            max_pixels=bounds["longest_edge"] if max_pixels is None else min(max_pixels, bounds["longest_edge"]),
        )

    def check_image(self, image: Image.Image) -> None:
        self._target_size(image)  # the processor's own rule: a ValueError for extreme aspect ratios

    def fit_image(self, image: Image.Image, max_pixels: int) -> Image.Image:
        """Resized to what the processor gives with its pixel bound lowered to ``max_pixels``; the processor
        then keeps that size. A bound at or above the processor's own changes nothing."""
        if max_pixels >= self.image_processor.size["longest_edge"]:
            return image
        height, width = self._target_size(image, max_pixels)
        if (height, width) == self._target_size(image):
            return image
        return image.convert("RGB").resize((width, height), Image.BICUBIC)

    def prefill_positions(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE position ids ``[3, B, L]`` from the model's own ``get_rope_index``; the next text position of
        a row is one past its largest position."""
        positions, _ = self.model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=batch["attention_mask"],
        )
        masked = positions.masked_fill(batch["attention_mask"][None] == 0, -1)
        return positions, masked.amax(dim=(0, 2)) + 1

    def decode_positions(self, next_positions: torch.Tensor) -> torch.Tensor:
        """A text token has the same position on the three M-RoPE axes: ``[3, B, 1]``."""
        return next_positions[None, :, None].expand(3, -1, 1)

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # M-RoPE needs the modality of each token: 0 text, 1 image.
        return {"mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32)}
