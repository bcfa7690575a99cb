"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from seeright.service.api.deps import AUTHORIZED, ClientDep, MetricsDep, SettingsDep
from seeright.service.api.protocol import ChatCompletionRequest, ChatCompletionResponse
from seeright.service.api.serving_chat import ChatServing

router = APIRouter(dependencies=AUTHORIZED)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, settings: SettingsDep, metrics: MetricsDep, client: ClientDep
) -> ChatCompletionResponse | StreamingResponse:
    return await ChatServing(settings, metrics, client).create(body)
