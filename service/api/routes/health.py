"""``GET /health`` and ``GET /metrics`` (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import ClientDep, MetricsDep, SettingsDep
from service.api.protocol import Health

router = APIRouter()


@router.get("/health")
async def health(settings: SettingsDep, client: ClientDep) -> Health:
    return Health(model=settings.name, queue_depth=client.depth)


@router.get("/metrics")
async def metrics(metrics: MetricsDep, client: ClientDep) -> Response:
    metrics.queue_depth.set(client.depth)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
