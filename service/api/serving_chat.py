"""Chat completions: an OpenAI request in, engine requests through the client, OpenAI responses out.

The router (``routes/chat.py``) only hands the body over; this module turns it into a
:class:`~service.engine.GenerationRequest` (images decoded off the event loop), runs it through the
:class:`~service.client.EngineClient` and builds the typed response or the SSE chunks.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from interventions.adapters import ChatTurn
from service.api.images import load_image
from service.api.metrics import Metrics
from service.api.protocol import (
    AssistantMessage, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, Choice,
    ChoiceLogprobs, ChunkChoice, Delta, ErrorResponse, ImagePart, TokenLogprob, Usage, completion_id, now,
)
from service.client import EngineClient
from service.engine import GenerationOutput, GenerationRequest, RequestError
from service.settings import Settings


def split_model(name: str, served: str) -> list[str]:
    """``served+preset+preset`` -> the presets; 404 for a model this server does not serve."""
    base, *presets = name.split("+")
    if base != served:
        raise HTTPException(404, f"model: {base!r} is not served here; this server serves {served!r}")
    return presets


def message_turn(i: int, message: ChatMessage, images: list, fields: list[str], settings: Settings) -> ChatTurn:
    """One message as a chat turn; its images are decoded and appended to ``images``, their part paths to
    ``fields``."""
    parts = [message.content] if isinstance(message.content, str) else message.content
    texts, count = [], 0
    for j, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, ImagePart):
            where = f"messages[{i}].content[{j}]"
            if message.role != "user":
                raise RequestError(where, "images are only allowed in user messages")
            if len(images) + 1 > settings.max_images_per_request:
                raise RequestError("messages", f"more than {settings.max_images_per_request} images")
            images.append(load_image(part.image_url.url, f"{where}.image_url", settings))
            fields.append(where)
            count += 1
        else:
            texts.append(part.text)
    return ChatTurn(message.role, "\n".join(texts), count)


def build_request(body: ChatCompletionRequest, settings: Settings) -> GenerationRequest:
    """Turns, images and settings of a chat request (decodes images: call it off the event loop)."""
    presets = split_model(body.model, settings.name)
    images: list = []
    fields: list[str] = []
    turns = [message_turn(i, message, images, fields, settings) for i, message in enumerate(body.messages)]
    if turns[-1].role != "user":
        raise RequestError("messages", "the last message must come from the user")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit)
    if max_tokens > settings.max_tokens_limit:
        raise RequestError("max_tokens", f"{max_tokens} exceeds this server's limit of {settings.max_tokens_limit}")
    interventions = {name: {} for name in presets} | (body.interventions or {})
    return GenerationRequest(
        turns=turns, images=images, interventions=interventions, max_new_tokens=max_tokens,
        temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop_list(), logprobs=body.logprobs,
        image_fields=tuple(fields),
    )


class DeltaText:
    """Turns streamed token ids into text deltas, holding back a torn UTF-8 character or a stop-string prefix."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        for stop in self.stops:
            if stop in text:
                text = text[: text.index(stop)]
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = len(text) - hold
        delta = text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def rest(self, final: str) -> str:
        return final[self.sent :] if len(final) > self.sent else ""


def usage(out: GenerationOutput) -> Usage:
    return Usage.of(out.prompt_tokens, len(out.token_ids))


def choice_logprobs(out: GenerationOutput, tokenizer: Any) -> ChoiceLogprobs | None:
    if out.logprobs is None:
        return None
    return ChoiceLogprobs(
        content=[TokenLogprob(token=tokenizer.decode([t]), logprob=lp) for t, lp in zip(out.token_ids, out.logprobs)]
    )


class ChatServing:
    """Serves chat completions for one app: its settings, metrics and engine client."""

    def __init__(self, settings: Settings, metrics: Metrics, client: EngineClient) -> None:
        self.settings, self.metrics, self.client = settings, metrics, client

    async def create(self, body: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        """Validate, queue and answer one request (a full queue raises ``QueueFull``: 503)."""
        started = time.perf_counter()
        gen = await run_in_threadpool(build_request, body, self.settings)
        self.client.validate(gen)
        label = "+".join(sorted(gen.interventions)) or "none"
        for method in sorted(gen.interventions) or ["none"]:
            self.metrics.method_requests.labels(method).inc()
        if body.stream:
            stream = self.client.stream(gen)
            self.metrics.queue_depth.set(self.client.depth)
            return StreamingResponse(
                self._events(body, gen, stream, label, started), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        out = await self.client.generate(gen)
        self._record(out, label, started)
        return ChatCompletionResponse(
            id=completion_id(), created=now(), model=body.model, usage=usage(out),
            choices=[Choice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason,
                            logprobs=choice_logprobs(out, self.client.tokenizer))],
        )

    def _record(self, out: GenerationOutput, label: str, started: float) -> None:
        self.metrics.requests.labels("200").inc()
        self.metrics.latency.labels(label).observe(time.perf_counter() - started)
        self.metrics.prompt_tokens.inc(out.prompt_tokens)
        self.metrics.completion_tokens.inc(len(out.token_ids))
        self.metrics.queue_depth.set(self.client.depth)

    async def _events(self, body: ChatCompletionRequest, gen: GenerationRequest, stream, label: str, started: float) -> AsyncIterator[str]:
        """SSE chunks: the role, text deltas, the finish reason, usage if asked, ``[DONE]``; an error mid-way
        becomes an error event (the status line is already sent)."""
        cid, created = completion_id(), now()

        def chunk(delta: Delta, finish: str | None = None) -> str:
            return ChatCompletionChunk(id=cid, created=created, model=body.model,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)]).sse()

        yield chunk(Delta(role="assistant", content=""))
        delta_text = DeltaText(self.client.tokenizer, gen.stop)
        try:
            async for token in stream:
                text = delta_text.push(token)
                if text:
                    yield chunk(Delta(content=text))
        except Exception as exc:  # noqa: BLE001 - reported in the stream, the server keeps serving
            yield self._error_event(exc)
            yield "data: [DONE]\n\n"
            return
        out = stream.output
        self._record(out, label, started)
        rest = delta_text.rest(out.text)
        if rest:
            yield chunk(Delta(content=rest))
        yield chunk(Delta(), out.finish_reason)
        if body.stream_options and body.stream_options.include_usage:
            yield ChatCompletionChunk(id=cid, created=created, model=body.model, choices=[], usage=usage(out)).sse()
        yield "data: [DONE]\n\n"

    def _error_event(self, exc: Exception) -> str:
        if isinstance(exc, RequestError):
            self.metrics.requests.labels("400").inc()
            error = ErrorResponse.of(str(exc), "invalid_request_error", exc.field, 400)
        else:
            self.metrics.requests.labels("500").inc()
            error = ErrorResponse.of(f"generation failed: {exc}", "server_error", code=500)
        return f"data: {json.dumps(error.model_dump())}\n\n"
