"""``GET /v1/models`` (the model, its presets and its LoRA adapters) and ``GET /v1/interventions`` (schemas and
defaults)."""

from __future__ import annotations

from fastapi import APIRouter

from seeright.service.api.deps import AUTHORIZED, ClientDep, SettingsDep
from seeright.service.api.protocol import InterventionCard, InterventionList, ModelCard, ModelList, now

router = APIRouter(dependencies=AUTHORIZED)


@router.get("/v1/models")
async def models(settings: SettingsDep, client: ClientDep) -> ModelList:
    ids = [settings.name] + [f"{settings.name}+{name}" for name in client.methods if client.unavailable(name) is None]
    adapters = [ModelCard(id=name, created=now(), root=lora.path, parent=settings.name) for name, lora in client.adapters.items()]
    return ModelList(data=[ModelCard(id=i, created=now()) for i in ids] + adapters)


@router.get("/v1/interventions", response_model_by_alias=True)
async def interventions(client: ClientDep) -> InterventionList:
    cards = [
        InterventionCard(
            name=name, description=(method.params_model.__doc__ or "").strip(),
            parameters=method.params_model.model_json_schema(), defaults=client.method_defaults(name),
            derived=client.derived_defaults(name), unavailable=client.unavailable(name),
        )
        for name, method in client.methods.items()
    ]
    return InterventionList(model_config_name=client.model_config.name, data=cards)
