"""The contract every intervention follows.

A method is a stateless object with up to three parts (architecture.md, "How an intervention plugs in"):

1. ``prepare(states, runner)``: per-request analysis before decoding (extra passes), batched over the
   requests of a batch that use the method. CARVE instead ``rewrite``s the request's images.
2. ``edit_probs(layer, probs, states, step, q0)``: post-softmax edits of attention rows.
3. ``edit_heads(layer, heads, states, step)``: scaling of per-head outputs before ``o_proj``.

Everything a request needs lives in its :class:`RowState`; the hooks receive the states of exactly the
batch rows that asked for the method (a ``StateBatch``: a list whose ``cache`` dict lasts for the call),
stacked along the first dimension of the tensors. What a hook wants (``probs_from``, ``wants_*``) may
depend on the layer and on ``step == 0`` (prefill) only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from PIL import Image
from pydantic import BaseModel

from interventions.adapters.base import ChatTurn, EncodedPrompt, ModelInfo
from interventions.layout import TokenLayout


@dataclass
class RequestInputs:
    """What one request asks about: the conversation, its images and (once encoded) the prompt."""

    turns: list[ChatTurn]
    images: list[Image.Image]
    prompt: EncodedPrompt | None = None
    editing: tuple[str, ...] = ()  # the request's methods that edit the forward passes of its generation


@dataclass
class RowState:
    """Per-request state of one hooks object. ``layout`` is set for the batch the row runs in."""

    hooks: Hooks
    params: Any = None
    request: RequestInputs | None = None
    layout: TokenLayout | None = None
    data: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)


class PassRunner(Protocol):
    """What the engine offers to ``prepare``/``rewrite``: encoding and batched extra passes."""

    info: ModelInfo

    def encode(self, turns: list[ChatTurn], images: list[Image.Image]) -> EncodedPrompt: ...

    def prefill(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], stop_after_layer: int | None
    ) -> None: ...

    def greedy(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], max_new_tokens: int
    ) -> list[list[int]]: ...

    def eos_token_ids(self) -> list[int]: ...


class Hooks:
    """Batched hook callbacks; the defaults do nothing. Subclasses override what they need."""

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        """First query row (index within this forward's query block) whose probabilities are needed."""
        return None

    def reads_only(self, state: RowState, layer: int, step: int) -> bool:
        """True when this state only reads the probabilities it asked for here (the output is not rewritten)."""
        return False

    def edit_probs(
        self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int
    ) -> torch.Tensor:
        """Edit ``probs`` ``[n, H, q - q0, T]`` (float32, post-softmax) for query rows ``q0:``."""
        return probs

    def wants_heads(self, state: RowState, layer: int, step: int) -> bool:
        return False

    def edit_heads(self, layer: int, heads: torch.Tensor, states: list[RowState], step: int) -> torch.Tensor:
        """Edit per-head outputs ``[n, q, H, head_dim]`` before ``o_proj``."""
        return heads

    def wants_hidden(self, state: RowState, layer: int, step: int) -> bool:
        return False

    def observe_hidden(self, layer: int, hidden: torch.Tensor, states: list[RowState], step: int) -> None:
        """See the residual stream ``[n, q, D]`` entering decoder layer ``layer``."""

    def wants(self, what: str, state: RowState, layer: int, step: int) -> bool:
        if what == "heads":
            return self.wants_heads(state, layer, step)
        return self.wants_hidden(state, layer, step)


class Method(Hooks):
    """An intervention: a name, a parameter model, and the hooks it uses."""

    name: ClassVar[str]
    params_model: ClassVar[type[BaseModel]]
    edits_generation: ClassVar[bool] = True  # False for methods that only rewrite the input (CARVE)

    def resolve(self, params: BaseModel, info: ModelInfo) -> BaseModel:
        """Fill model-dependent defaults (``None`` fields) and check layer indices against the model."""
        return params

    def new_state(self, params: BaseModel, info: ModelInfo, request: RequestInputs) -> RowState:
        if not request.images:
            raise ValueError("needs an image in the request")
        return RowState(hooks=self, params=self.resolve(params, info), request=request)

    def rewrite(self, states: list[RowState], runner: PassRunner) -> None:
        """Replace the requests' images before encoding (CARVE). Default: nothing."""

    def prepare(self, states: list[RowState], runner: PassRunner) -> None:
        """Per-request analysis passes before decoding. Default: nothing."""


def last_query_row(state: RowState, step: int) -> int:
    """Index of the last query row in this forward: the last prompt token at prefill, the new token after."""
    return state.layout.length - 1 if step == 0 else 0


def check_layers(field_name: str, layers: Sequence[int], num_layers: int) -> list[int]:
    """Sorted unique layer indices, or a ValueError naming the field when one is out of range."""
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise ValueError(f"{field_name}: layer indices {bad} out of range for a model with {num_layers} layers")
    return sorted(set(layers))


def cached(states: list[RowState], key: Any, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()`` once per call: kept in the ``StateBatch`` cache when the hook got one."""
    cache = getattr(states, "cache", None)
    if cache is None:
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]


def over_keys(states: list[RowState], key: Any, total: int, build: Callable[[], torch.Tensor], fill: Any) -> torch.Tensor:
    """A per-row tensor over key positions ``[n, total, ...]``, built once per call and extended with
    ``fill`` for generated tokens (a view of a buffer with spare room, so decode steps allocate nothing)."""
    cache = getattr(states, "cache", None)
    buf = None if cache is None else cache.get(key)
    if buf is None or buf.shape[1] < total:
        base = build() if buf is None else buf
        buf = base.new_full((base.shape[0], max(total, base.shape[1]) + 256, *base.shape[2:]), fill)
        buf[:, : base.shape[1]] = base
        if cache is not None:
            cache[key] = buf
    return buf[:, :total]


def row_masks(states: list[RowState], total: int, device: torch.device, which: str) -> torch.Tensor:
    """Per-row boolean masks (``which``: "image" or "query") over ``total`` key positions: ``[n, total]``."""
    build = {"image": lambda lay, t: lay.image_mask(t), "query": lambda lay, t: lay.query_mask(t)}[which]
    prompt = max(s.layout.length for s in states)
    return over_keys(
        states, ("mask", which), total, lambda: torch.stack([build(s.layout, prompt) for s in states]).to(device), False
    )


def per_row(states: list[RowState], attr: str, device: torch.device) -> torch.Tensor:
    """A float32 tensor ``[n]`` of one parameter across rows."""
    return cached(states, ("param", attr), lambda: torch.tensor([float(getattr(s.params, attr)) for s in states], device=device))
