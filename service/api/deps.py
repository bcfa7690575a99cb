"""Typed FastAPI dependencies: settings, metrics, the engine client, and API-key authentication."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a name derived from its key (never the key), and whether the key is an admin's."""

    id: str
    admin: bool = False


ANONYMOUS = Caller("anonymous", admin=True)  # a server without keys: everyone sees everything


def caller_of(request: Request, keys: KeyRing) -> Caller:
    """The caller of ``request`` by its Bearer key, each configured key compared in constant time; 401 otherwise."""
    if not keys.accepted:
        return ANONYMOUS
    header = request.headers.get("authorization", "")
    given = header[7:].encode() if header.startswith("Bearer ") else b""
    found = None
    for key in keys.accepted:
        if hmac.compare_digest(given, key.encode()):
            found = key
    if found is None:
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return Caller("key-" + hashlib.sha256(found.encode()).hexdigest()[:12], admin=found in keys.admins)


@dataclass(frozen=True)
class KeyRing:
    """The keys a server accepts (read once at start) and the admins' among them."""

    accepted: frozenset[str]
    admins: frozenset[str]

    @classmethod
    def of(cls, settings: Settings) -> KeyRing:
        return cls(*settings.keys())


def authorize(request: Request) -> Caller:
    return caller_of(request, request.app.state.keys)


AUTHORIZED = [Depends(authorize)]
CallerDep = Annotated[Caller, Depends(authorize)]
