"""``create_app``: the FastAPI application, its error format, limits and authentication."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from interventions.methods import METHODS
from service.api.chat import chat_completions
from service.api.evaluations import router as evaluations_router
from service.api.metrics import Metrics
from service.api.protocol import now
from service.engine import Engine, RequestError
from service.scheduler import Scheduler
from service.settings import Settings


def error_body(message: str, kind: str, param: str | None = None, code: int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, by header or while reading."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
        body = error_body(f"request body exceeds {self.limit} bytes", "request_too_large", code=413)
        await JSONResponse(body, status_code=413)(scope, receive, send)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The service for one model. Pass ``engine`` to reuse a loaded one (tests, embedding)."""
    settings = settings or Settings()
    engine = engine or Engine.from_pretrained(
        settings.model, device=settings.device, dtype=settings.dtype, model_config=settings.model_config_name
    )
    scheduler = Scheduler(engine, settings.max_batch_size, settings.batch_wait_ms / 1000, settings.queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()  # drains queued and running requests before exit

    app = FastAPI(title="seeright", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.scheduler, app.state.metrics = settings, scheduler, Metrics()
    app.state.evaluations = {}
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            param, message = "body", "body: malformed JSON"
        else:
            param = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            message = f"{param}: {err.get('msg')}"
        request.app.state.metrics.requests.labels("400").inc()
        return JSONResponse(error_body(message, "invalid_request_error", param, 400), status_code=400)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        request.app.state.metrics.requests.labels("400").inc()
        return JSONResponse(error_body(str(exc), "invalid_request_error", exc.field, 400), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(exc.detail), kind, code=exc.status_code), status_code=exc.status_code, headers=exc.headers)

    def authorize(request: Request) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].encode() if header.startswith("Bearer ") else b""
        matched = False
        for key in settings.api_keys:  # compare with every key, in constant time each
            matched |= hmac.compare_digest(given, key.encode())
        if not matched:
            raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorize)]
    app.post("/v1/chat/completions", dependencies=auth)(chat_completions)
    app.include_router(evaluations_router, dependencies=auth)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        ids = [settings.name] + [f"{settings.name}+{m}" for m in METHODS]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now(), "owned_by": "seeright"} for i in ids]}

    @app.get("/v1/interventions", dependencies=auth)
    async def interventions() -> dict:
        defaults = engine.model_config.methods
        return {
            "object": "list",
            "model_config": engine.model_config.name,
            "data": [
                {
                    "name": name,
                    "description": (method.params_model.__doc__ or "").strip(),
                    "parameters": method.params_model.model_json_schema(),
                    "defaults": defaults.get(name, {}),
                }
                for name, method in METHODS.items()
            ],
        }

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.name, "queue_depth": scheduler.depth}

    @app.get("/metrics")
    async def metrics() -> Response:
        app.state.metrics.queue_depth.set(scheduler.depth)
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
