"""Chat completions: an OpenAI request in, engine requests through the client, OpenAI responses out.

The router (``routes/chat.py``) only hands the body over; this module turns it into a
:class:`~seeright.service.engine.GenerationRequest` (images decoded off the event loop), runs it through the
:class:`~seeright.service.client.EngineClient` and builds the typed response or the SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import replace
from typing import Any

from fastapi.responses import Response, StreamingResponse
from pydantic import TypeAdapter
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from seeright.interventions.adapters import ChatTurn
from seeright.service.api.image_memory import ImageMemory, Reservation
from seeright.service.api.images import load_image
from seeright.service.api.metrics import Metrics
from seeright.service.api.model_ids import split_model
from seeright.service.api.protocol import (
    AssistantMessage, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, Choice,
    ChoiceLogprobs, ChunkChoice, Delta, ErrorResponse, ImagePart, TokenLogprob, TopLogprob, Usage, completion_id, now,
)
from seeright.service.client import EngineClient, TokenStream
from seeright.service.requests import GenerationOutput, GenerationRequest, RequestError, StreamedToken
from seeright.service.scheduler import QueueFull
from seeright.service.settings import Settings
from seeright.service.stops import StopMatcher


def message_turn(
    i: int, message: ChatMessage, images: list, fields: list[str], settings: Settings, reserve: Callable[[int], None] | None = None,
) -> ChatTurn:
    """One message as a chat turn; its images are decoded (each ``reserve``d first) and appended to ``images``, their
    part paths to ``fields``."""
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
            images.append(load_image(part.image_url.url, f"{where}.image_url", settings, reserve))
            fields.append(where)
            count += 1
        else:
            texts.append(part.text)
    return ChatTurn(message.role, "\n".join(texts), count)


def build_request(
    body: ChatCompletionRequest, settings: Settings, attention_maps: bool = True, reserve: Callable[[int], None] | None = None,
    adapters: Collection[str] = (),
) -> GenerationRequest:
    """Turns, images and settings of a chat request (decodes images: call it off the event loop). With
    ``diagnostics``, a request with an image also reads its attention map where the engine can (``attention_maps``);
    ``reserve`` is told each image's decoded size before it is decoded; ``adapters`` are the LoRA adapters served."""
    adapter, presets = split_model(body.model, settings.name, adapters)
    images: list = []
    fields: list[str] = []
    turns = [message_turn(i, message, images, fields, settings, reserve) for i, message in enumerate(body.messages)]
    if turns[-1].role != "user":
        raise RequestError("messages", "the last message must come from the user")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit)
    if max_tokens > settings.max_tokens_limit:
        raise RequestError("max_tokens", f"{max_tokens} exceeds this server's limit of {settings.max_tokens_limit}")
    stops = body.stop_list()
    if any(len(stop) > settings.max_stop_chars for stop in stops):
        raise RequestError("stop", f"a stop string is longer than this server's limit of {settings.max_stop_chars} characters")
    interventions = {name: {} for name in presets} | (body.interventions or {})
    if body.signals and body.signals.lookback:
        if "lookback" in interventions:
            raise RequestError("signals.lookback", "asked for both as signals and as interventions.lookback")
        if not images:
            raise RequestError("signals.lookback", "the lookback ratio is measured on an image: send one")
        interventions["lookback"] = {"features": body.signals.lookback_features}
    if body.signals and body.signals.agser:
        if "agser" in interventions:
            raise RequestError("signals.agser", "asked for both as signals and as interventions.agser")
        interventions["agser"] = {}
    if body.diagnostics and images and attention_maps:
        interventions.setdefault("attention_map", {})
    return GenerationRequest(
        turns=turns, images=images, interventions=interventions, max_new_tokens=max_tokens,
        temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stops, logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty, image_fields=tuple(fields),
        adapter=adapter,
    )


def choices_of(gen: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``n`` rows for ``n`` choices: choice i samples with ``seed + i`` (a fresh seed each without a seed)."""
    if n == 1:
        return [gen]
    return [replace(gen, seed=None if gen.seed is None else gen.seed + i) for i in range(n)]


class DeltaText:
    """Turns streamed token ids into text deltas, holding back a torn UTF-8 character or a stop-string prefix.

    Stop strings are matched by :class:`~seeright.service.stops.StopMatcher` in time proportional to the new
    text, so a client's long stop strings cost it, not the event loop."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.matcher = StopMatcher(stops)
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        cut = self.matcher.feed(text)
        safe = cut if cut is not None else len(text) - self.matcher.hold
        delta = text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def rest(self, final: str) -> str:
        return final[self.sent :] if len(final) > self.sent else ""


def usage(outs: list[GenerationOutput]) -> Usage:
    """The prompt once, the completion tokens of every choice."""
    return Usage.of(outs[0].prompt_tokens, sum(len(o.token_ids) for o in outs))


CONTEXT_TOKENS = 4  # tokens before a token decoded with it, so that its text is what it adds to the answer


def _texts(tokenizer: Any, token_ids: Sequence[int], before: Sequence[int] = ()) -> list[tuple[str, list[int]]]:
    """Each token's text where it would stand after ``before`` (what it adds to the decoded answer: a SentencePiece
    token decoded alone loses its leading space, so the pieces would not add up to the text), and its bytes. The
    context is decoded once for all the step's alternatives."""
    window = list(before[-CONTEXT_TOKENS:])
    head = tokenizer.decode(window) if window else ""
    texts = []
    for token_id in token_ids:
        full = tokenizer.decode([*window, token_id])
        text = full[len(head):] if window and full.startswith(head) else tokenizer.decode([token_id])
        texts.append((text, list(text.encode("utf-8"))))
    return texts


def token_logprob(tokenizer: Any, token: StreamedToken, before: Sequence[int] = ()) -> TokenLogprob:
    """A token's log-prob entry; its text and its alternatives' read in context (``before``: the tokens before it)."""
    top = token.top or []
    (text, raw), *alternatives = _texts(tokenizer, [token.id, *(tid for tid, _ in top)], before)
    return TokenLogprob(token=text, logprob=token.logprob, bytes=raw, top_logprobs=[
        TopLogprob(token=tt, logprob=lp, bytes=tb) for (tt, tb), (_, lp) in zip(alternatives, top)
    ])


SIGNAL_KEYS = {
    "lookback": ("mean_ratio", "per_token", "features", "hallucination_probability"),
    "agser": ("score", "attentive_query", "non_attentive_query", "attentive_answer", "non_attentive_answer",
              "attentive_consistency", "non_attentive_consistency"),
    "vif": ("relay", "scored"),  # the visual flow: what the next agent's request passes back as interventions.vif.relay
}


def choice_signals(out: GenerationOutput) -> dict[str, Any] | None:
    """The read-only signals of a choice (Lookback Lens ratios, AGSER's score), when the request asked for them."""
    signals = {name: {k: out.diagnostics[name][k] for k in keys if k in out.diagnostics[name]}
               for name, keys in SIGNAL_KEYS.items() if name in out.diagnostics}
    return signals or None


def choice_diagnostics(out: GenerationOutput, asked: bool) -> dict[str, Any] | None:
    """Each method's diagnostics when the request asked for them; the attention map has one entry per token."""
    if not asked:
        return None
    diagnostics = dict(out.diagnostics)
    if "attention_map" in diagnostics:
        maps = diagnostics["attention_map"]
        diagnostics["attention_map"] = {**maps, "maps": maps.get("maps", [])[: len(out.token_ids)]}
    return diagnostics


def choice_logprobs(out: GenerationOutput, tokenizer: Any) -> ChoiceLogprobs | None:
    if out.logprobs is None:
        return None
    tops = out.top_logprobs or [None] * len(out.token_ids)
    return ChoiceLogprobs(content=[
        token_logprob(tokenizer, StreamedToken(token_id, logprob, top), out.token_ids[:j])
        for j, (token_id, logprob, top) in enumerate(zip(out.token_ids, out.logprobs, tops))
    ])


LOGPROBS_PER_CALL = 64  # tokens' log-prob entries serialised per call (pydantic holds the GIL for one call)
_LOGPROB_LIST = TypeAdapter(list[TokenLogprob])


def choice_json(choice: Choice) -> str:
    """``choice`` serialised, its log-prob entries :data:`LOGPROBS_PER_CALL` tokens at a time: one call holds the GIL
    for its whole length, and the event loop waits that long at each of its turns while sixteen choices of 512 tokens
    with 20 alternatives each are serialised (on a loaded CPU, past half a second: ``tests/test_hostile.py``)."""
    if choice.logprobs is None:
        return choice.model_dump_json()
    content = choice.logprobs.content
    pieces = [_LOGPROB_LIST.dump_json(content[i:i + LOGPROBS_PER_CALL]).decode()[1:-1]
              for i in range(0, len(content), LOGPROBS_PER_CALL)]
    rest = choice.model_dump_json(exclude={"logprobs"})
    return rest[:-1] + ',"logprobs":{"content":[' + ",".join(pieces) + "]}}"


async def _merged(streams: list[TokenStream]) -> AsyncIterator[tuple[int, StreamedToken]]:
    """``(choice, token)`` from several token streams as they come; a failing stream raises here."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: TokenStream) -> None:
        try:
            async for token in stream:
                await queue.put((i, token, None))
            await queue.put((i, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, None, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(streams)
        while running:
            i, token, exc = await queue.get()
            if exc is not None:
                raise exc
            if token is None:
                running -= 1
            else:
                yield i, token
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            if stream.output is None:
                stream.cancel()


DISCONNECT_POLL_S = 0.5


async def _watch(disconnected: Callable[[], Awaitable[bool]], tasks: list[asyncio.Future]) -> None:
    """Cancel ``tasks`` (their requests leave the batch) once the client has gone."""
    while not all(task.done() for task in tasks):
        if await disconnected():
            for task in tasks:
                task.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


class ChatServing:
    """Serves chat completions for one app: its settings, metrics and engine client."""

    def __init__(self, settings: Settings, metrics: Metrics, client: EngineClient, images: ImageMemory) -> None:
        self.settings, self.metrics, self.client, self.images = settings, metrics, client, images

    async def create(
        self, body: ChatCompletionRequest, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> Response | StreamingResponse:
        """Validate, queue and answer one request (a full queue raises ``QueueFull``: 503). Everything whose cost
        the client sizes (images, the prompt's tokens, log-probs, the response's JSON) runs off the event loop; a
        non-streamed request whose client goes (``disconnected``) is cancelled."""
        started = time.perf_counter()
        held = self.images.reservation()  # the decoded images' bytes, given back when the request ends
        try:
            gen = await run_in_threadpool(self._prepare, body, held.take)
            label = "+".join(sorted(gen.interventions)) or "none"
            for method in sorted(gen.interventions) or ["none"]:
                self.metrics.method_requests.labels(method).inc()
            rows = choices_of(gen, body.n)
            if body.stream:
                streams = self._open_streams(rows)
                self.metrics.queue_depth.set(self.client.depth)
                events, release = self._events(body, gen, streams, label, started, held), held.release
                held = None  # the stream gives it back when it ends (or never starts: the background task)
                return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                         background=BackgroundTask(release))
            outs = await self._generate_all(rows, disconnected)
        finally:
            if held is not None:
                held.release()
        self._record(outs, label, started)
        content = await run_in_threadpool(self._response_json, body, outs)
        return Response(content, media_type="application/json")

    def _prepare(self, body: ChatCompletionRequest, reserve: Callable[[int], None]) -> GenerationRequest:
        """The engine request of a chat request, checked (images decoded, the prompt's length counted)."""
        gen = build_request(body, self.settings, self.client.unavailable("attention_map") is None, reserve, self.client.adapters)
        limit = self.client.max_prompt_tokens
        if limit is not None:
            text_tokens = sum(len(self.client.tokenizer(turn.text, add_special_tokens=False)["input_ids"])
                              for turn in gen.chat() if turn.text)
            if text_tokens > limit:
                raise RequestError("messages", f"the prompt's text alone is {text_tokens} tokens; this server takes "
                                   f"at most {limit}")
        self.client.validate(gen)
        return gen

    def _response_json(self, body: ChatCompletionRequest, outs: list[GenerationOutput]) -> bytes:
        """The non-streamed response, serialised (log-probs are read token by token: work sized by the client).
        Each choice is built and serialised on its own: pydantic holds the GIL for the whole of one call, and one
        call over sixteen choices of 512 tokens with 20 alternatives each would stall the event loop."""
        head = ChatCompletionResponse(id=completion_id(), created=now(), model=body.model, usage=usage(outs), choices=[])
        choices = [
            choice_json(Choice(index=i, message=AssistantMessage(content=out.text), finish_reason=out.finish_reason,
                               logprobs=choice_logprobs(out, self.client.tokenizer), signals=choice_signals(out),
                               diagnostics=choice_diagnostics(out, body.diagnostics)))
            for i, out in enumerate(outs)
        ]
        return (head.model_dump_json(exclude={"choices"})[:-1] + ',"choices":[' + ",".join(choices) + "]}").encode()

    def _open_streams(self, rows: list[GenerationRequest]) -> list[TokenStream]:
        """Queue every choice, or none: a full queue cancels those already queued."""
        streams: list[TokenStream] = []
        try:
            for row in rows:
                streams.append(self.client.stream(row))
        except QueueFull:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    async def _generate_all(
        self, rows: list[GenerationRequest], disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> list[GenerationOutput]:
        tasks = [asyncio.ensure_future(self.client.generate(row)) for row in rows]
        watcher = asyncio.ensure_future(_watch(disconnected, tasks)) if disconnected is not None else None
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    def _record(self, outs: list[GenerationOutput], label: str, started: float) -> None:
        self.metrics.requests.labels("200").inc()
        self.metrics.latency.labels(label).observe(time.perf_counter() - started)
        self.metrics.prompt_tokens.inc(outs[0].prompt_tokens)
        self.metrics.completion_tokens.inc(sum(len(o.token_ids) for o in outs))
        self.metrics.queue_depth.set(self.client.depth)

    async def _events(
        self, body: ChatCompletionRequest, gen: GenerationRequest, streams: list[TokenStream], label: str, started: float,
        held: Reservation,
    ) -> AsyncIterator[str]:
        try:
            async for event in self._stream_events(body, gen, streams, label, started):
                yield event
        finally:
            held.release()

    async def _stream_events(
        self, body: ChatCompletionRequest, gen: GenerationRequest, streams: list[TokenStream], label: str, started: float
    ) -> AsyncIterator[str]:
        """SSE chunks: each choice's role, its text deltas (each with its tokens' log-probs when asked), its finish
        reason (with its signals when asked), usage if asked, ``[DONE]``; an error mid-way becomes an error event (the status line is already sent)."""
        cid, created = completion_id(), now()

        def chunk(
            i: int, delta: Delta, finish: str | None = None, logprobs: ChoiceLogprobs | None = None,
            signals: dict[str, Any] | None = None, diagnostics: dict[str, Any] | None = None,
        ) -> str:
            choice = ChunkChoice(index=i, delta=delta, finish_reason=finish, logprobs=logprobs, signals=signals,
                                 diagnostics=diagnostics)
            return ChatCompletionChunk(id=cid, created=created, model=body.model, choices=[choice]).sse()

        for i in range(len(streams)):
            yield chunk(i, Delta(role="assistant", content=""))
        tokenizer = self.client.tokenizer
        deltas = [DeltaText(tokenizer, gen.stop) for _ in streams]
        pending: list[list[StreamedToken]] = [[] for _ in streams]  # log-probs of tokens whose text is held back
        sent = [0] * len(streams)
        try:
            async for i, token in _merged(streams):
                text = deltas[i].push(token.id)
                if gen.logprobs:
                    pending[i].append(token)
                if text:
                    first = len(deltas[i].ids) - len(pending[i])
                    logprobs = ChoiceLogprobs(content=[
                        token_logprob(tokenizer, t, deltas[i].ids[: first + k]) for k, t in enumerate(pending[i])
                    ]) if gen.logprobs else None
                    sent[i] += len(pending[i])
                    pending[i] = []
                    yield chunk(i, Delta(content=text), logprobs=logprobs)
        except Exception as exc:  # noqa: BLE001 - reported in the stream, the server keeps serving
            yield self._error_event(exc)
            yield "data: [DONE]\n\n"
            return
        outs = [stream.output for stream in streams]
        self._record(outs, label, started)
        for i, out in enumerate(outs):
            rest = deltas[i].rest(out.text)
            final = choice_logprobs(out, tokenizer)
            if final is not None:  # the tokens not yet sent with a delta (a stop string may have cut some)
                final = ChoiceLogprobs(content=final.content[sent[i]:])
            if rest:
                yield chunk(i, Delta(content=rest), logprobs=final)
                final = ChoiceLogprobs(content=[]) if final is not None else None
            yield chunk(i, Delta(), out.finish_reason, final, choice_signals(out), choice_diagnostics(out, body.diagnostics))
        if body.stream_options and body.stream_options.include_usage:
            yield ChatCompletionChunk(id=cid, created=created, model=body.model, choices=[], usage=usage(outs)).sse()
        yield "data: [DONE]\n\n"

    def _error_event(self, exc: Exception) -> str:
        if isinstance(exc, RequestError):
            self.metrics.requests.labels("400").inc()
            error = ErrorResponse.of(str(exc), "invalid_request_error", exc.field, 400)
        else:
            self.metrics.requests.labels("500").inc()
            error = ErrorResponse.of(f"generation failed: {exc}", "server_error", code=500)
        return f"data: {json.dumps(error.model_dump())}\n\n"
