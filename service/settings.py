"""Server settings: defaults < YAML file (``--config`` or ``SEERIGHT_CONFIG``) < ``SEERIGHT_*`` env vars < CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEERIGHT_", extra="forbid")

    model: str = "seeright/shapes-smol"
    served_model_name: str | None = Field(None, description="Name clients use; default: the model id.")
    model_config_name: str | None = Field(None, description="configs/models/<name>.yaml to use for defaults.")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: every method (the reference); vllm: vLLM's engine, the methods its worker hosts."
    )
    vllm_max_model_len: int | None = Field(None, ge=16, description="--engine vllm: context length; none: the model's.")
    vllm_step_tokens: int | None = Field(
        512, ge=16,
        description=(
            "--engine vllm: the most tokens one step runs, decoding rows' and newcomers' prompts together (vLLM's "
            "chunked prefill; fewer while rows decode, by step_budget): a prompt is split across steps, the rows its "
            "methods act on in one chunk; one whose methods edit every prompt row by the last runs layer by layer "
            "between steps first while others run (with step_budget), else whole, in a step of its own if it is longer "
            "than the budget (docs/engines.md); none: chunked prefill off, every prompt whole."
        ),
    )
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="--engine vllm: GPUs per model.")
    vllm_gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1,
        description="--engine vllm: share of device memory vLLM takes (of CPU memory on a CPU); none: 0.9 on a GPU, 0.25 on a CPU.",
    )
    vllm_block_size: int | None = Field(
        None, ge=1,
        description="--engine vllm: tokens per KV-cache block, the prefix cache's unit (a guided-decoding "
        "continuation reuses its kept candidate's full blocks); none: vLLM's default for the device (128 on a CPU).",
    )
    vllm_client_threads: int | None = Field(
        None, ge=1,
        description="--engine vllm: torch threads of the engine client's own work in the API process (the vision "
        "tower's passes and attacks); none: 1 on a CPU, whose cores vLLM's engine core computes on, torch's default "
        "on a GPU.",
    )
    vllm_engine_threads: int | None = Field(
        None, ge=1,
        description="--engine vllm: torch threads of vLLM's engine core on a CPU, where it runs its worker in its own "
        "process; none: where VLLM_CPU_NUM_OF_RESERVED_CPU is set, the process's cores less that reserve (at least "
        "one), as vLLM's multiprocess CPU executor binds them, else torch's default (every core); vLLM's on a GPU.",
    )
    vllm_client_niceness: int | None = Field(
        None, ge=0, le=19,
        description="--engine vllm: how far below the API process's priority the engine client's own work runs "
        "(its threads' niceness, on Linux), so that vLLM's engine core gets the cores first; none: 10 on a CPU, 0 on "
        "a GPU.",
    )
    adapters: dict[str, Path] = Field(
        default_factory=dict,
        description="LoRA adapters served beside the model, name -> PEFT adapter folder (``--adapter NAME=PATH``); a "
        "request picks one by its ``model`` (``NAME`` or ``NAME+preset``).",
    )
    max_lora_rank: int = Field(64, ge=1, description="The highest LoRA rank an adapter may have.")
    max_adapters: int = Field(16, ge=1, description="Adapters loaded at once (each holds its weights on the device).")
    runtime_adapters: bool = Field(
        False, description="POST /v1/load_lora_adapter and /v1/unload_lora_adapter are open (to admin keys).",
    )
    device: str = "cpu"
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys (``SEERIGHT_API_KEYS`` or the YAML file; not the command line); empty = no authentication.",
    )
    api_key_file: Path | None = Field(None, description="A file of Bearer keys, one per line (read at start).")
    admin_api_keys: list[str] = Field(
        default_factory=list, description="Keys that also see and cancel every key's evaluation jobs."
    )
    metrics_require_key: bool = Field(False, description="GET /metrics needs an API key too.")
    allowed_image_dir: Path | None = Field(None, description="Local image paths are served only under this folder.")
    allow_remote_urls: bool = Field(False, description="Fetch http(s) image URLs (never loopback/private hosts).")
    remote_timeout_s: float = Field(10.0, gt=0)

    max_request_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="All request headers together; more gets a 431.")
    max_images_per_request: int = Field(4, ge=1)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64)
    max_image_memory_bytes: int = Field(
        2 * 1024**3, ge=1024,
        description="Decoded images held by all requests being read, waiting or running; beyond it a 503 + Retry-After.",
    )
    max_tokens_limit: int = Field(1024, ge=1)
    max_stop_chars: int = Field(1000, ge=1, description="Characters of one stop string.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Prompt tokens of one request (images included); none: the model's context length."
    )
    default_max_tokens: int = Field(256, ge=1)

    eval_dir: Path = Field(Path("runs/evaluations"), description="Where POST /v1/evaluations writes results.")
    max_running_evaluations: int = Field(2, ge=1, description="Evaluation jobs queued or running at once; more is a 429.")

    max_batch_size: int = Field(8, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0)
    queue_size: int = Field(64, ge=1)
    max_kv_tokens: int | Literal["auto"] | None = Field(
        "auto",
        description=(
            "KV-cache budget in token slots (prompt + max_tokens of each running row); auto: half of the memory free "
            "at start (the device's, or the machine's on a CPU) over the model's bytes per cached token; none: rows only."
        ),
    )
    step_budget: float | None = Field(
        1.0, gt=0,
        description=(
            "Newcomer work (admission passes and prefill) run per decode step while rows decode, as a multiple of "
            "the decode step's time: a running stream's longest gap is about 1 + step_budget decode steps, a "
            "newcomer's admission about 1 + 1/step_budget times its time alone (docs/engines.md); none: whole "
            "admissions between two decode steps. --engine vllm: the prompt tokens a step takes beside decoding rows "
            "(from measured step times, within vllm_step_tokens) and the engine client's own tower work (tower passes, "
            "VE masking's attack) run per pause of the engine between two steps, and the pieces of a prompt run layer "
            "by layer per call (VHR's); none: vllm_step_tokens alone, the tower work beside the steps, such prompts "
            "whole."
        ),
    )
    retry_after_s: int = Field(1, ge=1)

    @classmethod
    def load(cls, config: str | Path | None = None, **overrides: Any) -> Settings:
        """Settings from an optional YAML file, env vars, then explicit overrides (None values ignored)."""
        file_values = yaml.safe_load(Path(config).read_text()) or {} if config else {}
        env = cls()  # env vars and defaults
        merged = {**file_values, **env.model_dump(exclude_unset=True), **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**merged)

    def keys(self) -> tuple[frozenset[str], frozenset[str]]:
        """Every accepted key and the admin keys among them (``api_keys``, ``api_key_file``, ``admin_api_keys``)."""
        from_file = []
        if self.api_key_file is not None:
            from_file = [line.strip() for line in self.api_key_file.read_text().splitlines() if line.strip()]
        admins = frozenset(self.admin_api_keys)
        return frozenset(self.api_keys) | frozenset(from_file) | admins, admins

    @property
    def name(self) -> str:
        return self.served_model_name or self.model
