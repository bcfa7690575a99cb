"""What travels through the engine: a request, its streamed tokens, its output, and the error that names a field.

The lowest step of the request path: every other module of the service may import this one; it imports none of
them but :mod:`seeright.service.decoding` (a row's decoding settings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from seeright.interventions.adapters import ChatTurn
from seeright.service.decoding import RowDecoding

MIN_LOGPROB = -9999.0  # reported for tokens a contrast's plausibility cutoff ruled out (-inf is not JSON)


class RequestError(ValueError):
    """A request the engine cannot serve; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class GenerationRequest:
    """One request: a prompt (or chat turns) with images, interventions and decoding settings."""

    prompt: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    turns: list[ChatTurn] | None = None
    system: str | None = None
    interventions: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: the k most likely tokens at each step
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    adapter: str | None = None  # a loaded LoRA adapter's name (``Engine.load_lora``); none: the base model
    image_fields: tuple[str, ...] = ()  # where each image came from (e.g. "messages[0].content[1]"), for errors

    def image_field(self, i: int) -> str:
        return self.image_fields[i] if i < len(self.image_fields) else f"images[{i}]"

    def chat(self) -> list[ChatTurn]:
        if self.turns is not None:
            return list(self.turns)
        if self.prompt is None:
            raise RequestError("prompt", "a prompt or chat turns are required")
        turns = [ChatTurn("system", self.system)] if self.system else []
        return [*turns, ChatTurn("user", self.prompt, len(self.images))]


@dataclass
class GenerationOutput:
    """What one request produced."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    timings: dict[str, float]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(frozen=True)
class StreamedToken:
    """One generated token as it is streamed: its id and, when the request asked for log-probs, the model's
    log-probability of it and the ``top_logprobs`` most likely tokens of its step."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def streamed_token(token: int, scores: torch.Tensor, request: GenerationRequest) -> StreamedToken:
    """``token`` with its log-probs from the step's raw ``scores`` (before sampling settings) if asked."""
    if not request.logprobs:
        return StreamedToken(token)
    return with_logprobs(token, scores, request.top_logprobs)


def with_logprobs(token: int, scores: torch.Tensor, top: int) -> StreamedToken:
    """The model's log-probability of ``token`` under ``scores`` and, with ``top``, the ``top`` most likely
    tokens of the step (floored at ``MIN_LOGPROB``)."""
    steps = scores.float().log_softmax(-1).clamp_min(MIN_LOGPROB)
    best = None
    if top:
        values, ids = steps.topk(top)
        best = list(zip(ids.tolist(), values.tolist()))
    return StreamedToken(token, float(steps[token]), best)


def decoding_of(request: GenerationRequest) -> RowDecoding:
    """The request's decoding settings, as one row of a batch."""
    return RowDecoding(
        request.max_new_tokens, request.temperature, request.top_p, request.seed, tuple(request.stop),
        request.presence_penalty, request.frequency_penalty, request.repetition_penalty,
    )


def add_logprobs(out: GenerationOutput, tokens: Sequence[StreamedToken], top: int) -> None:
    """Set ``out``'s log-probs from its tokens' (:func:`with_logprobs`), one per kept token."""
    kept = tokens[: len(out.token_ids)]
    out.logprobs = [t.logprob for t in kept]
    out.top_logprobs = [t.top for t in kept] if top else None
