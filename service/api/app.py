"""``create_app``: wiring only. The engine behind its scheduler and async client, metrics, limits, error
handlers and the routers (``service/api/routes``); the routes hand requests to the serving modules."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from seeright.service.api.deps import KeyRing
from seeright.service.api.errors import error_response, install_error_handlers
from seeright.service.api.image_memory import ImageMemory
from seeright.service.api.metrics import Metrics
from seeright.service.api.routes import adapters, chat, evaluations, health, models, ui
from seeright.service.api.serving_evaluations import EvaluationJobs
from seeright.service.client import EngineClient
from seeright.service.engine import Engine
from seeright.service.scheduler import Scheduler
from seeright.service.settings import Settings
from seeright.service.slicing import StepBudget


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, by header or while reading, and headers over
    ``header_limit`` bytes in all with 431 (whichever HTTP parser the server runs: httptools sets no limit)."""

    def __init__(self, app: ASGIApp, limit: int, header_limit: int) -> None:
        self.app, self.limit, self.header_limit = app, limit, header_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(k) + len(v) for k, v in scope["headers"]) > self.header_limit:
            return await error_response(431, f"request headers exceed {self.header_limit} bytes")(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, f"request body exceeds {self.limit} bytes")(scope, receive, send)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Every object alive on entry (the model, tokenizer and libraries: millions of long-lived objects) out of the
    garbage collector's sight until exit. A full collection, which one request that builds many objects can trigger
    (16 x 512 log-prob entries), then takes milliseconds instead of stopping every thread, the event loop included,
    for a third of a second. The app's lifespan holds it from its engine's start (the vLLM engine client imports vLLM
    and loads its copy of the tower there) to its stop, so that a process that outlives an app (the tests) gets
    its objects collected again (``gc.unfreeze``, as vLLM's engine core does at shutdown)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The service for one model. Pass ``engine`` to reuse a loaded one (tests, embedding); with
    ``settings.engine == "vllm"`` the model runs on vLLM (``service/vllm``) behind the same routes."""
    settings = settings or Settings()
    scheduler = None
    if settings.engine == "vllm":
        from seeright.service.vllm.engine import (
            VllmEngineClient,  # vLLM is imported when the engine starts
        )

        client: EngineClient | VllmEngineClient = VllmEngineClient.from_settings(settings)
    else:
        engine = engine or Engine.from_pretrained(
            settings.model, device=settings.device, dtype=settings.dtype, model_config=settings.model_config_name
        )
        if settings.max_prompt_tokens is not None:
            engine.max_prompt_tokens = settings.max_prompt_tokens
        for name, path in settings.adapters.items():
            if name not in engine.loras:
                engine.load_lora(name, path, settings.max_lora_rank)
        scheduler = Scheduler(
            engine, settings.max_batch_size, settings.batch_wait_ms / 1000, settings.queue_size, settings.max_kv_tokens,
            None if settings.step_budget is None else StepBudget(settings.step_budget),
        )
        client = EngineClient(scheduler)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await client.start()
        with frozen_heap():
            yield
        await client.stop()

    app = FastAPI(title="seeright", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.client = settings, Metrics(), client
    app.state.keys = KeyRing.of(settings)
    app.state.image_memory = ImageMemory(settings.max_image_memory_bytes)
    app.state.scheduler = scheduler  # for operators' introspection; routes use the client
    app.state.evaluations = EvaluationJobs(settings, client)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, header_limit=settings.max_header_bytes)
    install_error_handlers(app)
    for router in (chat.router, models.router, adapters.router, evaluations.router, health.router, ui.router):
        app.include_router(router)
    app.mount("/ui/static", ui.static_files(), name="ui-static")
    return app
