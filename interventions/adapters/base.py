"""What the runtime and the methods need to know about an architecture family.

An adapter says where the decoder layers and their attention modules are, how many heads there are
(GQA included), which token id marks image tokens and how image tokens form a grid, and how a chat is
written as a prompt. It also encodes a prompt into model inputs plus a :class:`TokenLayout`.

The runtime's contract with a model family (what a new adapter must make true):

* ``language_model``: the decoder stack module; its forward is called once per forward pass (the runtime
  counts steps with a pre-hook on it). ``decoder_layers``: its ``nn.ModuleList`` of layers, in order;
  each layer's forward takes the residual stream as its first argument or as ``hidden_states``.
* Each layer has ``self_attn`` with ``layer_idx``, ``num_key_value_groups`` and an ``o_proj`` linear whose
  input is the per-head outputs concatenated (``[batch, q, num_heads * head_dim]``), and computes
  attention through transformers' ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with the
  signature ``(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)`` and
  ``query``/``key``/``value`` as ``[batch, heads, seq, head_dim]``.
* The text config accepts ``set_attn_implementation({"text_config": name})`` (the vision tower keeps its own).
* ``info`` (:class:`ModelInfo`), ``image_token_id``, ``eos_token_ids``, and ``encode`` returning image tokens
  as one contiguous block per image that fills its ``(rows, cols)`` grid in row-major order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from torch.utils.hooks import RemovableHandle

from seeright.interventions.content_words import content_word_spans
from seeright.interventions.layout import TokenLayout


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation; ``num_images`` images come before its text."""

    role: str
    text: str
    num_images: int = 0

    def without_images(self) -> ChatTurn:
        return ChatTurn(self.role, self.text, 0)


@dataclass(frozen=True)
class Segment:
    """A piece of the prompt string; ``kind`` is "text", "image" (one image) or "query"."""

    text: str
    kind: str = "text"


class StopForward(Exception):
    """Raised by a hook to end a forward early (analysis passes after their last layer, embeddings or vision
    attentions read on the way)."""


@dataclass
class EncodedPrompt:
    """One prompt ready for the model: unpadded ids, per-prompt image tensors and its layout."""

    input_ids: torch.Tensor
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    layout: TokenLayout | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """Shapes of the language model that method parameters are checked against."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vision_cls_token: bool = False  # the vision tower has a [CLS] token (CLIP in LLaVA; not Qwen2-VL)
    vision_layers: int = 0  # tower layers up to the one the LLM reads, where their attention can be masked; else 0
    square_image: int | None = None  # the side of the square the processor centre-crops to (LLaVA's CLIP: 336); else None


class ModelAdapter(ABC):
    """Architecture-specific facts and prompt encoding for one loaded model."""

    family: ClassVar[str]

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    @abstractmethod
    def matches(cls, config: Any) -> bool:
        """Whether this adapter handles a model with this config."""

    # ---- model structure -------------------------------------------------------------------------
    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def info(self) -> ModelInfo:
        cfg = self.text_config
        heads = cfg.num_attention_heads
        return ModelInfo(
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            hidden_size=cfg.hidden_size,
            vision_cls_token=self.cls_token,
            vision_layers=self.maskable_vision_layers,
            square_image=self.square_image,
        )

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos)

    # ---- prompt building -------------------------------------------------------------------------
    @abstractmethod
    def segments(self, turns: list[ChatTurn]) -> list[Segment]:
        """The chat as prompt segments, the last user turn's text marked "query", generation tag last."""

    @abstractmethod
    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        """Pixel tensors for ``images`` and each image's token grid ``(rows, cols)``."""

    @abstractmethod
    def image_token_text(self) -> str:
        """The string of one image token (repeated once per image token in the prompt)."""

    def check_image(self, image: Image.Image) -> None:
        """Raise ValueError for an image this model's processor would refuse (fixed-size families take any)."""

    def fit_image(self, image: Image.Image, max_pixels: int) -> Image.Image:
        """The image as the processor would size it with at most ``max_pixels`` pixels (dynamic-resolution
        families); unchanged where the processor resizes to a fixed size anyway."""
        return image

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token tensors besides ``input_ids`` the model needs (padded with 0 in a batch)."""
        return {}

    # ---- vision tower ----------------------------------------------------------------------------
    cls_token: ClassVar[bool] = False  # whether the vision tower has a [CLS] token attending to the patches

    def cls_attention(self, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-softmax attention of the vision tower's [CLS] token to each image token's patch, summed over
        heads, in the tower's first layer and in the layer whose features the model takes: two
        ``[n_images, image tokens]``. Only where ``cls_token``."""
        raise ValueError(f"the {self.family} vision tower has no [CLS] token")

    @property
    def vision_blocks(self) -> list[nn.Module]:
        """The vision tower's transformer blocks, in order (where the scheduler may pause an admission,
        :mod:`seeright.service.slicing`)."""
        return []

    @property
    def maskable_vision_layers(self) -> int:
        """Vision-tower layers up to the one whose features the model takes, where :meth:`mask_vision_attention`
        can mask tokens; 0 where this adapter cannot."""
        return 0

    @property
    def square_image(self) -> int | None:
        """The side of the square the image processor centre-crops every image to, or None where it keeps the
        aspect ratio (Qwen2-VL's dynamic resolution)."""
        processor = self.image_processor
        if processor is None or not getattr(processor, "do_center_crop", False):
            return None
        crop = processor.crop_size
        height, width = (crop.height, crop.width) if hasattr(crop, "height") else (crop["height"], crop["width"])
        return int(height) if height == width else None

    @property
    def tower_modules(self) -> dict[str, nn.Module]:
        """The modules between the pixels and the language model's image embeddings (the vision tower, the
        projector), by the name their weights carry in a checkpoint; empty where this adapter does not name them
        (then the tower cannot run apart from the model: :meth:`seeright.service.engine.Engine.load_tower`)."""
        return {}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image embeddings ``[n_images, image tokens, hidden]`` the language model reads for normalised
        ``pixel_values`` (the tower's feature layer through the projector), under any vision-attention masks
        installed (:meth:`mask_vision_attention`)."""
        raise ValueError(f"the {self.family} adapter cannot compute its image embeddings apart from the model")

    def vision_states(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Outputs ``[n_images, tokens, D]`` of the tower's ``layers`` for normalised ``pixel_values``,
        differentiable with respect to them (the tower stops after the last of ``layers``)."""
        raise ValueError(f"the {self.family} adapter cannot read its vision tower's layers")

    def pixel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's per-channel mean and std (``pixel_values = (x - mean) / std`` for ``x`` in [0, 1])."""
        p = self.image_processor
        return torch.tensor(p.image_mean, dtype=torch.float32), torch.tensor(p.image_std, dtype=torch.float32)

    def mask_vision_attention(self, keep: torch.Tensor, target: str) -> list[RemovableHandle]:
        """Hooks that mask, in each vision-tower layer ``l``, the tokens where ``keep[image, l]`` is False, for
        every image of the next tower forward (``keep``: ``[images, layers, tokens]``, [CLS] first where the
        tower has one): ``target="outputs"`` zeroes their attention outputs before the output projection,
        ``"keys"`` adds ``finfo.min`` to their key columns. The caller removes them."""
        raise ValueError(f"the {self.family} adapter cannot mask its vision tower's attention")

    def prefill_positions(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids of a left-padded prefill batch (as ``generate`` builds them: real tokens count from 0,
        padding gets 1) and each row's next position ``[B]``."""
        mask = batch["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return positions, mask.long().sum(-1)

    def decode_positions(self, next_positions: torch.Tensor) -> torch.Tensor:
        """Position ids of one new token per row, ``[B, 1]``."""
        return next_positions[:, None]

    @staticmethod
    def concat_images(per_prompt: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Image tensors of a batch, prompts in order (what HF processors return for a batch)."""
        keys = {k for d in per_prompt for k in d}
        return {k: torch.cat([d[k] for d in per_prompt if k in d]) for k in sorted(keys)}

    def encode(self, turns: list[ChatTurn], images: list[Image.Image]) -> EncodedPrompt:
        """Tokenise a chat with its images and locate image, query and content-word tokens."""
        expected = sum(t.num_images for t in turns)
        if expected != len(images):
            raise ValueError(f"the messages reference {expected} images but {len(images)} were given")
        pixel_inputs, grids = self.image_inputs(images) if images else ({}, [])
        token_text = self.image_token_text()
        text, query_chars, grid_iter = "", (0, 0), iter(grids)
        for seg in self.segments(turns):
            if seg.kind == "image":
                rows, cols = next(grid_iter)
                text += seg.text.replace(token_text, token_text * (rows * cols))
                continue
            if seg.kind == "query":
                query_chars = (len(text), len(text) + len(seg.text))
            text += seg.text
        enc = self.tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
        ids = enc["input_ids"][0]
        offsets = enc["offset_mapping"][0].tolist()
        spans, positions = [], (ids == self.image_token_id).nonzero().flatten().tolist()
        start = 0
        for rows, cols in grids:
            block = positions[start : start + rows * cols]
            if len(block) != rows * cols or block[-1] - block[0] + 1 != rows * cols:
                raise ValueError("image tokens in the prompt do not match the image grid")
            spans.append((block[0], block[-1] + 1))
            start += rows * cols
        query_tokens = _tokens_in(offsets, [query_chars])
        content = _tokens_in(
            offsets, [(query_chars[0] + s, query_chars[0] + e) for s, e in content_word_spans(text[slice(*query_chars)])]
        )
        layout = TokenLayout(
            length=len(ids),
            pad=0,
            image_spans=tuple(spans),
            image_grids=tuple(grids),
            query_span=(query_tokens[0], query_tokens[-1] + 1) if query_tokens else (len(ids), len(ids)),
            content_positions=tuple(content),
        )
        return EncodedPrompt(input_ids=ids, images=pixel_inputs, layout=layout, extra=self.extra_inputs(ids))


def _tokens_in(offsets: list[list[int]], char_spans: list[tuple[int, int]]) -> list[int]:
    """Indices of tokens whose character offsets overlap any of ``char_spans``."""
    hits = []
    for i, (s, e) in enumerate(offsets):
        if e > s and any(s < ce and e > cs for cs, ce in char_spans):
            hits.append(i)
    return hits
