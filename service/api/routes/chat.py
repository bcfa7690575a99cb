"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from seeright.service.api.deps import AUTHORIZED, ClientDep, MetricsDep, SettingsDep
from seeright.service.api.protocol import ChatCompletionRequest
from seeright.service.api.serving_chat import ChatServing

router = APIRouter(dependencies=AUTHORIZED)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, settings: SettingsDep, metrics: MetricsDep, client: ClientDep
) -> Response | StreamingResponse:
    """An OpenAI chat completion (``docs/api.md``); the response is :class:`~seeright.service.api.protocol.ChatCompletionResponse`."""
    serving = ChatServing(settings, metrics, client, request.app.state.image_memory)
    return await serving.create(body, request.is_disconnected)
