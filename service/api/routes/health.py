"""``GET /health`` and ``GET /metrics`` (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from seeright.service.api.deps import ClientDep, MetricsDep, SettingsDep, authorize
from seeright.service.api.metrics import Metrics
from seeright.service.api.protocol import Health
from seeright.service.client import EngineClient

router = APIRouter()


@router.get("/health")
async def health(settings: SettingsDep, client: ClientDep) -> Health:
    return Health(model=settings.name, queue_depth=client.depth)


def exposition(metrics: Metrics, client: EngineClient) -> bytes:
    """The app's metrics in Prometheus text format, the queue depth read now."""
    metrics.queue_depth.set(client.depth)
    return generate_latest(metrics.registry)


@router.get("/metrics")
async def metrics(request: Request, settings: SettingsDep, metrics: MetricsDep, client: ClientDep) -> Response:
    """Prometheus metrics; behind the API keys when the operator asks (``metrics_require_key``)."""
    if settings.metrics_require_key:
        authorize(request)
    return Response(exposition(metrics, client), media_type=CONTENT_TYPE_LATEST)
