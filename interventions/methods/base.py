"""The contract every intervention follows.

A method is a stateless object that declares what it is (name, parameter model, defaults, the hook
points it uses, its order among methods, its literal reference and its sweep settings) and implements
the hooks it declared, nothing else:

* ``rewrite(states, passes)``   (:attr:`HookPoint.INPUT`): replace the request's images before encoding (CARVE).
* ``prepare(states, passes)``   (:attr:`HookPoint.ANALYSIS`): per-request analysis passes before decoding,
  batched over the requests of a batch that use the method. ``passes`` is a :class:`Passes`: encoding and
  the extra forward passes a method may ask for, never the engine itself.
* ``observe_hidden(layer, hidden, states, step)`` (:attr:`HookPoint.HIDDEN`): the residual stream entering a layer.
* ``edit_scores(layer, scores, states, step, q0)`` (:attr:`HookPoint.SCORES`): pre-softmax attention logits.
* ``edit_probs(layer, probs, states, step, q0)`` (:attr:`HookPoint.PROBS`): post-softmax attention rows.
* ``edit_heads(layer, heads, states, step)``   (:attr:`HookPoint.HEADS`): per-head outputs before ``o_proj``.
* ``vision_mask(state)`` (:attr:`HookPoint.VISION`): which of the request's image tokens each layer of the
  vision tower masks, and how (:class:`VisionMask`, VE masking); the other rows' images are untouched.
* ``candidates(params)``, ``start_chunk(state)`` and ``choose(states, chunks, rows)`` (:attr:`HookPoint.CANDIDATES`):
  the request decodes as several sampled rows, a chunk at a time; after each chunk the method keeps one candidate,
  whose cache row, tokens and states every candidate then takes (Lookback Lens guided decoding).
* ``contrast_prompt(state, passes)`` and ``contrast(scores, branch, state)`` (:attr:`HookPoint.LOGITS`): the
  request gets a contrast branch, a second row with its own prompt (a noised or transformed image, or none)
  and its own KV cache, fed the request's tokens without interventions; each step the request's next-token
  scores are ``contrast`` of its raw logits and the branch's, before penalties and sampling.
* ``reflect(states, passes, answers)`` (:attr:`HookPoint.REFLECT`): passes of its own once the requests' answers
  are final (AGSER re-asks parts of the query), batched over the requests that end together, before their outputs
  are returned.

A method's module is all there is to it: the registry (``seeright.interventions.registry``) finds it, and the
engine, the HTTP API, presets, ``seeright bench``, the load test and the testbed sweeps take its name,
schema and settings from there.

Everything a request needs lives in its :class:`RowState`; the hooks receive the states of exactly the
batch rows that asked for the method (a ``StateBatch``: a list whose ``cache`` dict lasts for the call),
stacked along the first dimension of the tensors. What a hook wants (``probs_from``, ``wants_*``) may
depend on the layer and on ``step == 0`` (prefill) only.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from PIL import Image
from pydantic import BaseModel

from seeright.interventions.adapters.base import ChatTurn, EncodedPrompt, ModelInfo
from seeright.interventions.lora import Lora
from seeright.interventions.layout import TokenLayout

T = TypeVar("T")


@dataclass(frozen=True)
class VisionMask:
    """One request's mask in the vision tower: ``keep`` ``[n_images, vision layers, tokens]`` bool over the
    tower's tokens ([CLS] first where it has one), False where layer ``l`` masks token ``t``; ``target`` says
    how: ``"outputs"`` zeroes the token's attention output, ``"keys"`` hides it as a key from every query."""

    target: str
    keep: torch.Tensor


@dataclass
class RequestInputs:
    """What one request asks about: the conversation, its images and (once encoded) the prompt."""

    turns: list[ChatTurn]
    images: list[Image.Image]
    prompt: EncodedPrompt | None = None
    lora: Lora | None = None  # the LoRA adapter the request runs on: its analysis passes use it too


@dataclass
class RowState:
    """Per-request state of one hooks object. ``layout`` is set for the batch the row runs in.

    ``companions`` names the request's other methods that edit its forward passes (GIFT reads its saliency
    inside the generation's own prefill only when there are none)."""

    hooks: Hooks
    params: Any = None
    request: RequestInputs | None = None
    layout: TokenLayout | None = None
    data: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    companions: frozenset[str] = frozenset()


class HookPoint(enum.Enum):
    """Where a method acts. The runtime installs a hook point's hooks only while a row needs them."""

    INPUT = "input"  # rewrite(): the request's images, before encoding
    ANALYSIS = "analysis"  # prepare(): extra passes before decoding
    HIDDEN = "hidden"  # observe_hidden(): residual stream entering a decoder layer
    SCORES = "scores"  # edit_scores(): pre-softmax attention logits
    PROBS = "probs"  # edit_probs(): post-softmax attention rows
    HEADS = "heads"  # edit_heads(): per-head outputs before o_proj
    LOGITS = "logits"  # contrast(): next-token scores against a contrast branch of the request's own
    VISION = "vision"  # vision_mask(): image tokens masked in the vision tower's self-attention
    CANDIDATES = "candidates"  # candidates() rows sample each chunk; choose() keeps one (guided decoding)
    REFLECT = "reflect"  # reflect(): passes after the answer is final (self-reflection detectors)


EDITING_POINTS = frozenset({HookPoint.SCORES, HookPoint.PROBS, HookPoint.HEADS, HookPoint.VISION, HookPoint.CANDIDATES})
PASS_POINTS = frozenset({HookPoint.INPUT, HookPoint.ANALYSIS})


class Passes(Protocol):
    """What ``prepare``/``rewrite`` may ask of the engine: encoding and batched extra passes."""

    info: ModelInfo

    def encode(self, turns: list[ChatTurn], images: list[Image.Image]) -> EncodedPrompt: ...

    def prefill(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], stop_after_layer: int | None
    ) -> None: ...

    def greedy(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], max_new_tokens: int
    ) -> list[list[int]]: ...

    def eos_token_ids(self) -> list[int]: ...

    def decode_text(self, ids: list[int]) -> str: ...

    def cls_attention(self, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def vision_states(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]: ...

    def pixel_stats(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The result of ``compute`` for ``key``, computed once per engine while it stays in the engine's bounded
        cache (:mod:`seeright.interventions.memo`): for passes whose result depends on nothing but the key."""
        ...


def acting_order(hooks: Hooks) -> tuple[int, str]:
    """Where ``hooks`` act among others on one row: their ``order``, ties by name (PAINT inherits PAI's order); the
    registry lists methods so and a batch runs its hooks so."""
    return hooks.order, getattr(hooks, "name", "")


class Hooks:
    """Batched hook callbacks; the defaults do nothing. Subclasses override what they need.

    Where several hooks objects edit the same layer, they act in ``order`` (lower first, ties by name:
    :func:`acting_order`), whatever the rows of the batch: a row's result never depends on which methods its
    batch-mates use."""

    order: ClassVar[int] = 100

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        """First query row (index within this forward's query block) whose attention scores and
        probabilities are needed (``edit_scores`` and ``edit_probs`` receive rows from there on)."""
        return None

    def reads_only(self, state: RowState, layer: int, step: int) -> bool:
        """True when this state only reads the probabilities it asked for here (the output is not rewritten)."""
        return False

    def row_causal(self, state: RowState, layer: int) -> bool:
        """Whether the prefill's rows from :meth:`probs_from` on may come in chunks, in order: each row's edit (or
        read) depends on the keys up to it and on what :meth:`observe_hidden` saw of the rows up to it, nothing
        later. An engine that splits a prompt then runs each chunk's rows as they come and calls
        :meth:`observe_hidden` at every chunk with the residual stream of the prompt's rows so far. The default,
        False: those rows in one forward, and :meth:`observe_hidden` once, with the whole prompt's stream."""
        return False

    def edit_scores(
        self, layer: int, scores: torch.Tensor, states: list[RowState], step: int, q0: int
    ) -> torch.Tensor:
        """Edit ``scores`` ``[n, H, q - q0, T]`` (float32 ``QK^T * scaling``, masked keys at the float32
        minimum) for query rows ``q0:``, before the softmax. Called before any ``edit_probs`` of the layer."""
        return scores

    def edit_probs(
        self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int
    ) -> torch.Tensor:
        """Edit ``probs`` ``[n, H, q - q0, T]`` (float32, post-softmax) for query rows ``q0:``."""
        return probs

    def wants_heads(self, state: RowState, layer: int, step: int) -> bool:
        return False

    def heads_from(self, state: RowState, layer: int, step: int) -> int | None:
        """Where :meth:`wants_heads`: the first query row from which ``edit_heads`` must see the rows in one forward
        (it leaves the rows before it as they are); None where it edits each row on its own, so that a prompt's rows
        may come in chunks, each edited as it runs. The default, 0: every row at once (an engine that splits prompts
        keeps such a prompt whole)."""
        return 0

    def edit_heads(self, layer: int, heads: torch.Tensor, states: list[RowState], step: int) -> torch.Tensor:
        """Edit per-head outputs ``[n, q, H, head_dim]`` before ``o_proj``."""
        return heads

    def wants_hidden(self, state: RowState, layer: int, step: int) -> bool:
        return False

    def observe_hidden(self, layer: int, hidden: torch.Tensor, states: list[RowState], step: int) -> None:
        """See the residual stream ``[n, q, D]`` entering decoder layer ``layer``."""

    def vision_mask(self, state: RowState) -> VisionMask | None:
        """How this row's images are masked in the vision tower, or None to leave the tower alone."""
        return None

    def wants(self, what: str, state: RowState, layer: int, step: int) -> bool:
        if what == "heads":
            return self.wants_heads(state, layer, step)
        return self.wants_hidden(state, layer, step)


class Method(Hooks):
    """An intervention and everything the rest of seeright needs to know about it.

    Defaults of a request's parameters, lowest first: the fields of ``params_model``, then
    :meth:`defaults` (rules derived from the model, e.g. layers scaled to its depth, for fields the
    model config leaves unset), then the model's config entry (``configs/models/*.yaml``), then the named
    preset the request asks for (``presets``: settings a release ran, e.g. PAINT's CHAIR script), then the
    request's own values. ``GET /v1/interventions`` shows the result for the served model.
    """

    name: ClassVar[str]
    params_model: ClassVar[type[BaseModel]]
    hook_points: ClassVar[frozenset[HookPoint]]
    order: ClassVar[int] = 100  # rank when one request asks for several methods (lower acts first)
    literal: ClassVar[str | None] = None  # "module:Class" of a test-only literal version (``seeright bench``)
    sweep: ClassVar[tuple[dict[str, Any], ...]] = ()  # settings the testbed tables run besides the defaults
    mixed_traffic: ClassVar[bool] = True  # part of the mixed loads of ``seeright bench`` and ``loadtest``
    signal: ClassVar[bool] = False  # reads the forward and edits nothing (Lookback Lens): no testbed row
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # named settings of a release (``"preset": NAME``), over the defaults
    tower_passes: ClassVar[bool] = False  # its analysis runs the vision tower alone (``Passes.cls_attention``, ``vision_states``)
    branch_from_pixels: ClassVar[bool] = False  # its contrast branch is the request's own prompt with edited pixels

    @property
    def edits_generation(self) -> bool:
        """Whether the method changes the forward passes of the request's generation."""
        return not self.signal and bool(self.hook_points & EDITING_POINTS)

    def contrasts(self, params: BaseModel) -> bool:
        """Whether a request with these parameters runs a contrast branch (:attr:`HookPoint.LOGITS`)."""
        return HookPoint.LOGITS in self.hook_points

    def contrast_prompt(self, state: RowState, passes: Passes) -> EncodedPrompt:
        """The contrast branch's prompt, once the request is encoded (``state.request.prompt``)."""
        raise NotImplementedError(f"{self.name} declares no contrast branch")

    def contrast(self, scores: torch.Tensor, branch: torch.Tensor, state: RowState) -> torch.Tensor:
        """The request's next-token scores ``[V]`` from its raw logits and its branch's (float32)."""
        raise NotImplementedError(f"{self.name} declares no contrast branch")

    def edit_branch_pixels(self, pixels: torch.Tensor, state: RowState) -> torch.Tensor:
        """Where ``branch_from_pixels``: the branch's pixel tensor from the request's (the image processor's output
        for all of the request's images, as the model takes it); the branch's prompt is otherwise the request's."""
        raise NotImplementedError(f"{self.name}'s contrast branch is a prompt of its own")

    def candidates(self, params: BaseModel) -> int:
        """Rows a request with these parameters decodes as (:attr:`HookPoint.CANDIDATES`): 1 = its own only."""
        return 1

    def start_chunk(self, state: RowState) -> None:
        """A candidate's state at the start of a chunk (:attr:`HookPoint.CANDIDATES`)."""

    def choose(self, states: list[RowState], chunks: list[list[int]], rows: list[int]) -> int:
        """Which candidate's chunk the request keeps (:attr:`HookPoint.CANDIDATES`): ``states[i]`` is candidate
        i's state of this method, ``chunks[i]`` its chunk's tokens, ``rows[i]`` the decode forwards that made them."""
        raise NotImplementedError(f"{self.name} declares no candidates")

    @property
    def runs_passes(self) -> bool:
        """Whether the method runs forward passes of its own before the request's generation."""
        return bool(self.hook_points & PASS_POINTS)

    def defaults(self, info: ModelInfo) -> dict[str, Any]:
        """Defaults derived from the model (its depth, its width) for fields left ``None``."""
        return {}

    def check(self, params: BaseModel, info: ModelInfo) -> BaseModel:
        """Check parameters against the model (layer indices, dims); a ValueError names the field."""
        return params

    def new_state(
        self, params: BaseModel, info: ModelInfo, request: RequestInputs, companions: frozenset[str] = frozenset()
    ) -> RowState:
        """The row's state for checked ``params`` (see :meth:`check`); a ValueError when the request's
        inputs do not suit the method."""
        if not request.images:
            raise ValueError("needs an image in the request")
        return RowState(hooks=self, params=params, request=request, companions=companions)

    def check_prompt(self, state: RowState) -> None:
        """Check the row's parameters against its encoded prompt (``state.request.prompt``): a ValueError naming the
        field when they do not fit it (ViF's relay tokens past the request's image tokens). Default: nothing."""

    def rewrite(self, states: list[RowState], passes: Passes) -> None:
        """Replace the requests' images before encoding (CARVE). Default: nothing."""

    def prepare(self, states: list[RowState], passes: Passes) -> None:
        """Per-request analysis passes before decoding. Default: nothing."""

    def reflect(self, states: list[RowState], passes: Passes, answers: list[Answer]) -> None:
        """Passes once the requests' answers ``answers`` are final (:attr:`HookPoint.REFLECT`). Default: nothing."""


@dataclass(frozen=True)
class Answer:
    """A request's final answer, as :meth:`Method.reflect` sees it: its tokens, its text (cut at a stop string) and
    the request's token budget (``max_new_tokens``)."""

    tokens: list[int]
    text: str
    max_new_tokens: int


def plausible(scores: torch.Tensor, original: torch.Tensor, beta: float) -> torch.Tensor:
    """Adaptive plausibility (VCD Eq. 4): ``scores`` at -inf where ``p(y) < beta * max_y p(y)`` under the
    request's own logits ``original``, i.e. ``original < log(beta) + max(original)``."""
    cutoff = math.log(beta) + original.max()
    return scores.masked_fill(original < cutoff, float("-inf"))


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
