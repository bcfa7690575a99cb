"""``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``: vLLM's shapes, for admin keys, when the server
was started with ``--runtime-adapters``."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import PlainTextResponse

from seeright.interventions.lora import LoraError
from seeright.service.api.deps import CallerDep, ClientDep, SettingsDep
from seeright.service.api.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from seeright.service.requests import RequestError
from seeright.service.settings import Settings

router = APIRouter()


def _allowed(settings: Settings, admin: bool) -> None:
    if not settings.runtime_adapters:
        raise HTTPException(403, "loading adapters at run time is off on this server (start it with --runtime-adapters)")
    if not admin:
        raise HTTPException(403, "loading and unloading adapters needs an admin key")


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load(body: LoadLoraAdapterRequest, settings: SettingsDep, client: ClientDep, caller: CallerDep) -> str:
    _allowed(settings, caller.admin)
    if body.lora_name == settings.name:
        raise RequestError("lora_name", f"{body.lora_name!r} is the base model's name")
    try:
        await client.load_adapter(body.lora_name, body.lora_path, settings.max_lora_rank, settings.max_adapters)
    except LoraError as exc:
        if exc.field in ("lora_name", "lora_path"):
            raise RequestError(exc.field, exc.message) from exc
        raise RequestError("lora_path", str(exc)) from exc  # a field of the folder's config or weights
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload(body: UnloadLoraAdapterRequest, settings: SettingsDep, client: ClientDep, caller: CallerDep) -> str:
    _allowed(settings, caller.admin)
    try:
        await client.unload_adapter(body.lora_name)
    except KeyError:
        raise HTTPException(404, f"lora_name: no adapter {body.lora_name!r} is loaded") from None
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
