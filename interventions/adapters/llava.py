"""LLaVA-1.5 as in llava-hf (`LlavaForConditionalGeneration`): CLIP tower, MLP projector, Llama decoder."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.hooks import RemovableHandle

from seeright.interventions.adapters.base import ChatTurn, ModelAdapter, Segment, StopForward
from seeright.interventions.thread_hooks import this_thread_only


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
        if "<|im_start|>" in (self.tokenizer.chat_template or ""):  # a ChatML language model (SmolLM2)
            return chatml_segments(turns, self.image_token_text(), default_system(self.tokenizer.chat_template))
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

    cls_token = True

    @property
    def vision_feature_layer(self) -> int:
        """The CLIP layer whose outputs LLaVA projects (-2, the penultimate, for LLaVA-1.5), as an index."""
        layer = self.model.config.vision_feature_layer
        return layer % self.model.config.vision_config.num_hidden_layers

    @property
    def vision_encoder(self) -> torch.nn.Module:
        tower = self.model.model.vision_tower
        return tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder  # transformers 4 / 5

    @property
    def vision_blocks(self) -> list[torch.nn.Module]:
        return list(self.vision_encoder.layers)

    @property
    def maskable_vision_layers(self) -> int:
        return self.vision_feature_layer + 1

    @property
    def tower_modules(self) -> dict[str, torch.nn.Module]:
        return {"vision_tower": self.model.model.vision_tower, "multi_modal_projector": self.model.model.multi_modal_projector}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        with torch.inference_mode():
            out = self.model.model.get_image_features(
                pixel_values=pixel_values.to(self.model.device, self.model.dtype),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
        return torch.stack(list(out.pooler_output))  # one [image tokens, hidden] per image

    def vision_states(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        last = max(layers)

        def capture(layer: int):
            def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
                out[layer] = output[0] if isinstance(output, tuple) else output
                if layer == last:
                    raise StopForward
            return hook

        handles = [self.vision_encoder.layers[l].register_forward_hook(this_thread_only(capture(l))) for l in set(layers)]
        try:
            self.model.model.vision_tower(pixel_values.to(self.model.device, self.model.dtype))
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return out

    def mask_vision_attention(self, keep: torch.Tensor, target: str) -> list[RemovableHandle]:
        """Per layer that masks a token: ``"outputs"``, a pre-hook on ``out_proj`` that zeroes the masked tokens'
        rows of ``softmax(QK^T)V``; ``"keys"``, a pre-hook on the attention that adds ``finfo.min`` to their key
        columns through the attention mask CLIP passes to its attention function."""
        handles = []
        for layer, block in enumerate(self.vision_encoder.layers[: keep.shape[1]]):
            tokens = keep[:, layer]  # [images, tokens]
            if bool(tokens.all()):
                continue
            if target == "outputs":
                def zero_rows(module: torch.nn.Module, args: tuple, tokens: torch.Tensor = tokens) -> tuple:
                    rows = args[0]  # [images, tokens, width]
                    return (rows * tokens.to(rows.device, rows.dtype)[:, :, None], *args[1:])

                handles.append(block.self_attn.out_proj.register_forward_pre_hook(this_thread_only(zero_rows)))
                continue

            def hide_keys(module: torch.nn.Module, args: tuple, kwargs: dict, columns: torch.Tensor = tokens) -> tuple:
                hidden = args[0] if args else kwargs["hidden_states"]
                bias = torch.zeros(columns.shape, dtype=hidden.dtype, device=hidden.device)
                bias = bias.masked_fill(~columns.to(hidden.device), torch.finfo(hidden.dtype).min)
                bias = bias[:, None, None, :].expand(-1, 1, hidden.shape[1], -1)
                given = kwargs.get("attention_mask")
                kwargs["attention_mask"] = bias if given is None else given + bias
                return args, kwargs

            handles.append(block.self_attn.register_forward_pre_hook(this_thread_only(hide_keys), with_kwargs=True))
        return handles

    def cls_attention(self, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's ``softmax(q_cls K^T * scale)`` recomputed from the first and the feature layer's attention
        input (after ``layer_norm1``), so it does not depend on the tower's attention implementation; the tower
        stops after the feature layer. Columns: the patches (the [CLS] column dropped, as LLaVA drops its token)."""
        encoder = self.vision_encoder
        layers = [0, self.vision_feature_layer]
        out: dict[int, torch.Tensor] = {}

        def capture(layer: int):
            def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]  # [n, 1 + patches, D]
                n, tokens, _ = hidden.shape
                q = module.q_proj(hidden[:, :1]).view(n, 1, module.num_heads, module.head_dim).transpose(1, 2)
                k = module.k_proj(hidden).view(n, tokens, module.num_heads, module.head_dim).transpose(1, 2)
                probs = torch.softmax((q @ k.transpose(-1, -2)).float() * module.scale, dim=-1)  # [n, H, 1, T]
                out[layer] = probs[:, :, 0, 1:].sum(1)
                if layer == max(layers):
                    raise StopForward
            return hook

        handles = [encoder.layers[l].self_attn.register_forward_pre_hook(this_thread_only(capture(l)), with_kwargs=True) for l in set(layers)]
        try:
            with torch.inference_mode():
                self.model.model.vision_tower(images["pixel_values"].to(self.model.device, self.model.dtype))
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return out[layers[0]], out[layers[1]]


def default_system(chat_template: str) -> str | None:
    """The system message a ChatML template adds when the chat has none (SmolLM2's), or None."""
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", chat_template, re.DOTALL)
    return found.group(1) if found else None


def chatml_segments(turns: list[ChatTurn], image_text: str, system: str | None) -> list[Segment]:
    """``<|im_start|>role\n{images}\n{text}<|im_end|>\n`` per turn, the template's default system turn first
    when the chat has none, and the generation tag last (the language model's own chat template, images as
    ``<image>`` lines before the text, as LLaVA places them)."""
    last_user = max(i for i, t in enumerate(turns) if t.role == "user")
    out: list[Segment] = []
    if turns[0].role != "system" and system is not None:
        out.append(Segment(f"<|im_start|>system\n{system}<|im_end|>\n"))
    for i, turn in enumerate(turns):
        out.append(Segment(f"<|im_start|>{turn.role}\n"))
        out.extend(Segment(image_text + "\n", "image") for _ in range(turn.num_images))
        out.append(Segment(turn.text, "query" if i == last_user else "text"))
        out.append(Segment("<|im_end|>\n"))
    out.append(Segment("<|im_start|>assistant\n"))
    return out
