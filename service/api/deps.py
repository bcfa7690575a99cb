"""Typed FastAPI dependencies: settings, metrics, the engine client, and API-key authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from seeright.service.api.metrics import Metrics
from seeright.service.client import EngineClient
from seeright.service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_client(request: Request) -> EngineClient:
    return request.app.state.client


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ClientDep = Annotated[EngineClient, Depends(get_client)]


def authorize(request: Request, settings: SettingsDep) -> None:
    """Bearer-key check against every configured key, each compared in constant time."""
    if not settings.api_keys:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].encode() if header.startswith("Bearer ") else b""
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(given, key.encode())
    if not matched:
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})


AUTHORIZED = [Depends(authorize)]
