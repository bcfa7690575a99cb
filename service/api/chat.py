"""``POST /v1/chat/completions``: OpenAI chat messages in, completions (or SSE chunks) out."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from interventions.adapters import ChatTurn
from service.api.images import load_image
from service.api.protocol import ChatCompletionRequest, ImagePart, completion_id, now
from service.engine import GenerationOutput, GenerationRequest, RequestError
from service.scheduler import Job, QueueFull


def split_model(name: str, served: str) -> list[str]:
    """``served+preset+preset`` -> the presets; 404 for a model this server does not serve."""
    base, *presets = name.split("+")
    if base != served:
        raise HTTPException(404, f"model: {base!r} is not served here; this server serves {served!r}")
    return presets


def build_request(body: ChatCompletionRequest, app_state: Any) -> GenerationRequest:
    """Turns, images and settings of a chat request (decodes images: call it off the event loop)."""
    settings = app_state.settings
    presets = split_model(body.model, settings.name)
    turns, images = [], []
    for i, message in enumerate(body.messages):
        parts = [body.messages[i].content] if isinstance(message.content, str) else message.content
        texts, count = [], 0
        for j, part in enumerate(parts):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, ImagePart):
                if message.role != "user":
                    raise RequestError(f"messages[{i}].content[{j}]", "images are only allowed in user messages")
                count += 1
                if len(images) + 1 > settings.max_images_per_request:
                    raise RequestError("messages", f"more than {settings.max_images_per_request} images")
                images.append(load_image(part.image_url.url, f"messages[{i}].content[{j}].image_url", settings))
            else:
                texts.append(part.text)
        turns.append(ChatTurn(message.role, "\n".join(texts), count))
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


def _usage(out: GenerationOutput) -> dict[str, int]:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": len(out.token_ids),
        "total_tokens": out.prompt_tokens + len(out.token_ids),
    }


def _logprobs(out: GenerationOutput, tokenizer: Any) -> dict[str, Any] | None:
    if out.logprobs is None:
        return None
    return {
        "content": [
            {"token": tokenizer.decode([t]), "logprob": lp, "top_logprobs": []} for t, lp in zip(out.token_ids, out.logprobs)
        ]
    }


async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state
    started = time.perf_counter()
    gen = await run_in_threadpool(build_request, body, state)
    state.scheduler.engine.validate(gen)
    methods = sorted(gen.interventions) or ["none"]
    for m in methods:
        state.metrics.method_requests.labels(m).inc()
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue[int] = asyncio.Queue()
    job = Job(gen, loop, loop.create_future(), tokens.put_nowait if body.stream else None)
    try:
        state.scheduler.submit(job)
    except QueueFull:
        state.metrics.requests.labels("503").inc()
        retry = str(state.settings.retry_after_s)
        return JSONResponse(
            {"error": {"message": "the server is at capacity; retry later", "type": "overloaded", "param": None, "code": 503}},
            status_code=503, headers={"Retry-After": retry},
        )
    state.metrics.queue_depth.set(state.scheduler.depth)
    cid, created = completion_id(), now()
    label = "+".join(methods)

    def record(out: GenerationOutput) -> None:
        state.metrics.requests.labels("200").inc()
        state.metrics.latency.labels(label).observe(time.perf_counter() - started)
        state.metrics.prompt_tokens.inc(out.prompt_tokens)
        state.metrics.completion_tokens.inc(len(out.token_ids))
        state.metrics.queue_depth.set(state.scheduler.depth)

    if not body.stream:
        try:
            out = await job.future
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        record(out)
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": out.text},
                "finish_reason": out.finish_reason, "logprobs": _logprobs(out, state.scheduler.engine.tokenizer),
            }],
            "usage": _usage(out),
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    delta_text = DeltaText(state.scheduler.engine.tokenizer, gen.stop)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        payload = {
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            yield chunk({"role": "assistant", "content": ""})
            while not job.future.done() or not tokens.empty():
                getter = asyncio.ensure_future(tokens.get())
                await asyncio.wait({getter, job.future}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                text = delta_text.push(getter.result())
                if text:
                    yield chunk({"content": text})
            try:
                out = job.future.result()
            except RequestError as exc:
                state.metrics.requests.labels("400").inc()
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error', 'param': exc.field}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            except Exception as exc:
                state.metrics.requests.labels("500").inc()
                yield f"data: {json.dumps({'error': {'message': f'generation failed: {exc}', 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            record(out)
            rest = delta_text.rest(out.text)
            if rest:
                yield chunk({"content": rest})
            yield chunk({}, out.finish_reason)
            if include_usage:
                payload = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                           "choices": [], "usage": _usage(out)}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            job.cancelled.set()
            raise

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
