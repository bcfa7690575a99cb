"""Scale-out on Ray Serve: N engine replicas behind one OpenAI-compatible entry point.

``seeright serve --replicas N`` deploys one Ray Serve application of two deployments:

* ``EngineReplica`` (N replicas, each a Ray actor process with ``replica_cpus`` CPUs and ``replica_gpus`` GPUs):
  the whole single-process app (:func:`~seeright.service.api.app.create_app`: engine, scheduler, routes) run in-process.
  The gateway hands it each HTTP request as an ASGI scope and body; it streams back the ASGI messages its app
  sends, with an ``x-seeright-replica`` header. Ray Serve's health check calls :meth:`EngineReplica.check_health`
  (the scheduler's worker must be alive) and replaces a replica that fails it or dies.
* ``Gateway`` (one replica, no CPU reserved), the HTTP ingress: forwards every request to a replica chosen by
  Ray Serve's router (fewest queued requests of two sampled); a replica that dies before answering gives a
  503 with ``Retry-After`` (after a stream started, a final SSE ``error`` event), never a hang or a 500.
  It also serves ``/metrics`` (every replica's metrics with a ``replica`` label), ``/health`` (the
  replicas' health) and the evaluation jobs, whose items it spreads over the replicas (:class:`ReplicaPool`).

Ray is an optional extra (``pip install -e ".[ray]"``); nothing here is imported by the default server.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Collection
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RaySystemError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from seeright.service.api.app import BodyLimit, create_app
from seeright.service.api.deps import KeyRing
from seeright.service.api.errors import error_response, install_error_handlers
from seeright.service.api.metrics import Metrics
from seeright.service.api.routes import evaluations
from seeright.service.api.routes.health import exposition
from seeright.service.api.serving_evaluations import EvaluationJobs
from seeright.service.requests import GenerationOutput, GenerationRequest, RequestError
from seeright.service.settings import Settings

REPLICA_HEADER = "x-seeright-replica"
UNAVAILABLE = (RayActorError, RaySystemError, DeploymentUnavailableError, BackPressureError)
HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}
POOL_RETRIES = 60  # evaluation items wait this many Retry-After periods for a replica to come back


class ReplicaUnavailable(Exception):
    """The replica serving a request died or could not be reached: the client may retry."""


@serve.deployment(name="EngineReplica")
class EngineReplica:
    """One engine and its scheduler in a Ray actor, serving the single-process app in-process."""

    async def __init__(self, settings: dict[str, Any], threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.settings = Settings(**settings)
        self.app = create_app(self.settings)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the scheduler's worker

    async def http(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[dict[str, Any]]:
        """Run one HTTP request through the app; yield the ASGI messages it sends, as they come."""
        sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        disconnected = asyncio.Event()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        app = asyncio.ensure_future(self.app({**scope, "app": self.app}, receive, sent.put))
        try:
            while True:
                message = asyncio.ensure_future(sent.get())
                await asyncio.wait({message, app}, return_when=asyncio.FIRST_COMPLETED)
                if not message.done():
                    message.cancel()
                    app.result()  # the app's own exception, if it raised one
                    return
                item = message.result()
                if item["type"] == "http.response.start":
                    item = {**item, "headers": [*item.get("headers", []), (REPLICA_HEADER.encode(), self.replica.encode())]}
                yield item
                if item["type"] == "http.response.body" and not item.get("more_body"):
                    return
        finally:
            disconnected.set()  # a client that left mid-stream: the route cancels its request
            if not app.done():
                await asyncio.wait({app}, timeout=5)

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        return await self.app.state.client.generate(request, wait_for_room=True)

    async def check(self, request: GenerationRequest) -> None:
        self.app.state.client.validate(request)

    async def check_interventions(self, interventions: dict[str, dict[str, Any]]) -> None:
        self.app.state.client.validate_interventions(interventions)

    def metrics(self) -> tuple[str, str]:
        """This replica's id and its Prometheus text."""
        return self.replica, exposition(self.app.state.metrics, self.app.state.client).decode()

    def health(self) -> dict[str, Any]:
        return {"replica": self.replica, "queue_depth": self.app.state.client.depth}

    def check_health(self) -> None:
        """Ray Serve's periodic health check: the scheduler's worker thread must be alive."""
        if not self.app.state.client.alive:
            raise RuntimeError("the engine is not running")

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)


class ReplicaPool:
    """The evaluation jobs' client over the replicas: each item goes to a replica picked by Ray Serve's router;
    an item whose replica died is sent again (after ``Retry-After``), so a job loses and repeats nothing."""

    def __init__(self, handle: Any, retry_after_s: int, adapters: Collection[str] = ()) -> None:
        self.handle, self.retry_after_s = handle, retry_after_s
        self.adapters = adapters  # every replica loads the settings' adapters at start (run-time loading is refused)

    async def _call(self, method: str, *args: Any) -> Any:
        for _ in range(POOL_RETRIES):
            try:
                return await getattr(self.handle, method).remote(*args)
            except UNAVAILABLE:
                await asyncio.sleep(self.retry_after_s)
        raise ReplicaUnavailable(f"no replica answered {method} after {POOL_RETRIES} tries")

    async def generate(self, request: GenerationRequest, wait_for_room: bool = False) -> GenerationOutput:
        return await self._call("generate", request)

    async def check(self, request: GenerationRequest) -> None:
        await self._call("check", request)

    async def check_interventions(self, interventions: dict[str, dict[str, Any]]) -> None:
        await self._call("check_interventions", interventions)


def labelled(text: str, replica: str) -> str:
    """Prometheus text with a ``replica`` label on every sample (HELP and TYPE lines kept once by the caller)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line:
            out.append(line)
            continue
        name, rest = re.match(r"([^\s{]+)(.*)", line).groups()
        rest = rest[1:] if rest.startswith("{") else "}" + rest
        out.append(f'{name}{{replica="{replica}"{"," if not rest.startswith("}") else ""}{rest}')
    return "\n".join(out)


def merged_metrics(parts: list[tuple[str, str]]) -> str:
    """One exposition of every replica's metrics: each family's HELP/TYPE once, then its samples per replica."""
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for replica, text in sorted(parts):
        family = ""
        for line in labelled(text, replica).splitlines():
            if line.startswith("# HELP") or line.startswith("# TYPE"):
                family = line.split()[2]
                if line not in headers.setdefault(family, []):
                    headers[family].append(line)
            elif line:
                families.setdefault(family, []).append(line)
    return "".join("\n".join([*headers[f], *families.get(f, [])]) + "\n" for f in headers)


def gateway_app(settings: Settings, replicas: Any, count: int) -> FastAPI:
    """The entry point's app for ``count`` replicas: evaluation jobs (each batch ``batch_size`` items per replica),
    merged metrics and health here; every other path forwarded."""
    app = FastAPI(title="seeright gateway", version="0.1.0")
    app.state.settings, app.state.metrics, app.state.keys = settings, Metrics(), KeyRing.of(settings)
    app.state.evaluations = EvaluationJobs(settings, ReplicaPool(replicas, settings.retry_after_s, list(settings.adapters)),
                                           engines=count)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, header_limit=settings.max_header_bytes)
    install_error_handlers(app)
    app.include_router(evaluations.router)

    @app.exception_handler(ReplicaUnavailable)
    async def unavailable(request: Request, exc: ReplicaUnavailable) -> JSONResponse:
        return error_response(503, str(exc), headers={"Retry-After": str(settings.retry_after_s)})

    async def every_replica(method: str) -> list[Any]:
        """``method`` on every live replica; a replica lost meanwhile makes it a 503 (retry)."""
        try:
            return await asyncio.to_thread(lambda: replicas.broadcast(method).results())
        except UNAVAILABLE as exc:
            raise ReplicaUnavailable(f"a replica was lost while answering ({type(exc).__name__}); retry") from exc

    @app.post("/v1/load_lora_adapter")
    @app.post("/v1/unload_lora_adapter")
    async def adapters_fixed() -> JSONResponse:
        return error_response(501, "adapters cannot be loaded or unloaded at run time across replicas; give them at start "
                              "(--adapter NAME=PATH or the settings' adapters)")

    @app.get("/metrics")
    async def metrics() -> Response:
        parts = await every_replica("metrics")
        return Response(merged_metrics(parts), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        states = await every_replica("health")
        return {"status": "ok", "model": settings.name, "replicas": sorted(states, key=lambda s: s["replica"]),
                "queue_depth": sum(s["queue_depth"] for s in states)}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    async def forward(request: Request) -> Response:
        body = await request.body()  # within max_request_bytes (BodyLimit)
        messages = replicas.options(stream=True).http.remote(_plain_scope(request.scope), body)
        try:
            start = await messages.__anext__()
        except UNAVAILABLE as exc:
            return error_response(503, f"the replica serving this request is gone ({type(exc).__name__}); retry",
                                  headers={"Retry-After": str(settings.retry_after_s)})
        headers = {k.decode(): v.decode() for k, v in start.get("headers", []) if k.lower() not in HOP_HEADERS}
        return StreamingResponse(_body(messages, settings.retry_after_s), status_code=start["status"], headers=headers)

    return app


async def _body(messages: Any, retry_after_s: int) -> AsyncIterator[bytes]:
    """The response body as the replica sends it; if the replica dies mid-stream, a final SSE error event."""
    try:
        async for message in messages:
            if message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]
    except UNAVAILABLE as exc:
        error = ('{"error": {"message": "the replica serving this stream is gone (%s); retry", "type": "overloaded", '
                 '"code": 503, "retry_after": %d}}' % (type(exc).__name__, retry_after_s))
        yield f"data: {error}\n\n".encode()


def _plain_scope(scope: dict[str, Any]) -> dict[str, Any]:
    """The picklable part of an HTTP scope (no app, router or state objects)."""
    keys = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
            "headers", "client", "server")
    return {k: scope[k] for k in keys if k in scope} | {"root_path": ""}


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Gateway:
    def __init__(self, settings: dict[str, Any], replicas: Any, count: int) -> None:
        self._gateway = gateway_app(Settings(**settings), replicas, count)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._gateway


def application(settings: Settings, replicas: int, replica_cpus: float = 1, replica_gpus: float = 0) -> Any:
    """The Ray Serve application: ``replicas`` engine replicas behind the gateway."""
    if replicas < 1:
        raise RequestError("replicas", "must be at least 1")
    config = settings.model_dump(mode="json")
    # replicas sit behind the gateway, which checks the keys: theirs never travel in Ray's deployment arguments
    # (the gateway's do, unless they come from api_key_file, which it reads on its own node)
    keyless = {**config, "api_keys": [], "admin_api_keys": [], "api_key_file": None}
    engine = EngineReplica.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        max_ongoing_requests=settings.queue_size, health_check_period_s=5, health_check_timeout_s=30,
    ).bind(keyless, max(1, int(replica_cpus)) if not replica_gpus else None)
    return Gateway.bind(config, engine, replicas)


def serve_replicas(
    settings: Settings, replicas: int, ray_address: str | None = None, replica_cpus: float = 1, replica_gpus: float = 0,
    blocking: bool = True,
) -> Any:
    """Start (or join, with ``ray_address``) a Ray cluster and run the application on ``settings.host:port``."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(application(settings, replicas, replica_cpus, replica_gpus), name="seeright", route_prefix="/",
                     blocking=blocking)
