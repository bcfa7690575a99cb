"""Request and response models of the OpenAI-compatible API (plus the ``interventions`` extra field)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_STOP_STRINGS = 4
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as vLLM takes it (choice i samples with seed + i)


class ImageURL(BaseModel):
    url: str = Field(max_length=50_000_000)
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"only {{'type': 'text'}} is supported (no structured output), got {value!r}")
        return value


# OpenAI fields this server does not implement: sent with a value, each is a 400 naming it, never ignored.
UNSUPPORTED_FIELDS = (
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio", "prediction", "logit_bias",
    "web_search_options", "reasoning_effort",
)
MAX_CHOICES = 16


class Signals(BaseModel):
    """Read-only signals returned with each choice (``choices[i].signals``; streamed: its finish chunk)."""

    model_config = ConfigDict(extra="forbid")

    lookback: bool = Field(False, description="Lookback Lens ratios: how much each token looks back at the image.")
    lookback_features: bool = Field(False, description="With lookback: each token's L x H ratios (detector features).")
    agser: bool = Field(
        False,
        description=(
            "AGSER's zero-shot hallucination score (lower: more likely hallucinated), its two sub-queries, their "
            "answers and consistencies: two more generations once the answer is final (interventions.agser to set "
            "its parameters)."
        ),
    )


class ChatCompletionRequest(BaseModel):
    """``temperature`` defaults to 0 (greedy), the decoding hallucination benchmarks use. Unknown vendor fields
    (``user``, ``metadata``, ``store``, ...) are accepted and ignored; the OpenAI features listed in
    :data:`UNSUPPORTED_FIELDS` are refused by name."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="A signed 64-bit integer.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings, as OpenAI allows.")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices, generated as rows of one batch (seed + i each).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2, description="vLLM / HF style: >1 discourages repeats.")
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text"]] | None = None
    interventions: dict[str, dict[str, Any]] | None = None
    signals: Signals | None = None
    diagnostics: bool = Field(
        False,
        description=(
            "Return each method's diagnostics with each choice (``choices[i].diagnostics``; streamed: its finish chunk) "
            "and, for a request with an image, where the model looked: ``attention_map`` (docs/playground.md, diagnostics)."
        ),
    )
    user: str | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    prediction: Any = None
    logit_bias: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None

    @field_validator(*UNSUPPORTED_FIELDS)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> None:
        if value is not None:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


# ---- responses -----------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None
    signals: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None
    signals: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def sse(self) -> str:
        """One server-sent event; deltas carry only their set fields, as OpenAI's do."""
        data = self.model_dump(mode="json")
        for choice in data["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            for extra in ("signals", "diagnostics"):
                if choice.get(extra) is None:
                    choice.pop(extra, None)
        if data.get("usage") is None:
            data.pop("usage", None)
        return f"data: {json.dumps(data)}\n\n"


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error object; every error of the API is built by ``ErrorResponse.of``."""

    error: ErrorInfo

    @classmethod
    def of(cls, message: str, kind: str, param: str | None = None, code: int | None = None) -> ErrorResponse:
        return cls(error=ErrorInfo(message=message, type=kind, param=param, code=code))


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "seeright"
    root: str | None = Field(None, description="An adapter's folder (as vLLM lists LoRA adapters).")
    parent: str | None = Field(None, description="An adapter's base model.")


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter`` body."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=200)
    lora_int_id: int | None = None  # accepted for vLLM clients; names identify adapters here


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class InterventionCard(BaseModel):
    name: str
    description: str
    parameters: dict[str, Any]
    defaults: dict[str, Any] = Field(description="This model's defaults: rules derived from the model, then its config entry.")
    derived: list[str] = Field(description="Parameters whose default is derived from the model's shape (no config value).")
    unavailable: str | None = Field(None, description="Why this model cannot run the method (then no preset is listed).")


class InterventionList(BaseModel):
    object: Literal["list"] = "list"
    model_config_name: str = Field(serialization_alias="model_config")
    data: list[InterventionCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    queue_depth: int


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
