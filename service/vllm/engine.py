"""``VllmEngineClient``: the engine client of ``seeright serve --engine vllm``, on vLLM's ``AsyncLLM``.

It has the doors of :class:`seeright.service.client.EngineClient` (``validate``, ``generate``, ``stream``, the method
cards), so the OpenAI routes, streaming, usage, log-probs, limits, metrics, errors and evaluation jobs are the
same code on both engines. Prompts are built by a weightless copy of the transformers engine (the model on the
meta device: same chat template, same checks, same parameter resolution) and go to vLLM as token ids with
the images as multi-modal data; vLLM expands the image placeholders.

Requests without interventions run on vLLM unchanged. VHR runs inside vLLM (:mod:`seeright.service.vllm.worker`): with
fixed ``heads`` in one request; otherwise its text-only pass is a request of its own, scheduled first, whose
heads' outputs the worker keeps for the request's head selection. Every other method needs the attention
probabilities of each row (vLLM exposes none: vllm-project/vllm#3192) or a second sequence decoded in lockstep
(the contrastive methods), and is refused with a 400 that names the transformers engine.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch

from seeright.interventions.spec import VHRParams
from seeright.model_zoo import resolve_model_path
from seeright.service.engine import Engine
from seeright.service.requests import MIN_LOGPROB, GenerationOutput, GenerationRequest, RequestError, StreamedToken
from seeright.service.scheduler import QueueFull, when_room
from seeright.service.settings import Settings
from seeright.service.vllm.worker import EXTRA_ARGS_KEY

HOSTED = frozenset({"vhr"})
VLLM_ATTENTION_ISSUE = "https://github.com/vllm-project/vllm/issues/3192"


def engine_args(settings: Settings) -> Any:
    """vLLM's engine arguments: eager (the hooks run in Python), prompts never split across steps (a request's
    head selection sees its whole prompt in one forward), our worker extension."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    max_len = settings.vllm_max_model_len
    return AsyncEngineArgs(
        model=resolve_model_path(settings.model), served_model_name=[settings.name], dtype=settings.dtype,
        max_model_len=max_len, max_num_batched_tokens=max(max_len or 0, 2048) if max_len else None,
        max_num_seqs=settings.max_batch_size, enforce_eager=True, enable_chunked_prefill=False,
        tensor_parallel_size=settings.vllm_tensor_parallel_size,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization or (0.9 if torch.cuda.is_available() else 0.25),
        worker_extension_cls="seeright.service.vllm.worker.HeadScaling", disable_log_stats=True,
    )


class VllmTokenStream:
    """Tokens of one request as vLLM makes them; ``output`` is set when iteration ends normally."""

    def __init__(self, client: VllmEngineClient, request: GenerationRequest) -> None:
        self._client, self.request = client, request
        self.output: GenerationOutput | None = None
        self._open = True

    def cancel(self) -> None:
        """Give the slot back (the request, if running, is aborted when its iteration is closed)."""
        if self._open:
            self._open = False
            self._client._inflight -= 1

    async def __aiter__(self) -> AsyncIterator[StreamedToken]:
        try:
            async for token in self._client._run(self.request, self):
                yield token
        finally:
            self.cancel()


class VllmEngineClient:
    """Async generation on vLLM plus the method cards and checks of the transformers engine."""

    def __init__(self, settings: Settings, spec: Engine) -> None:
        self.settings, self.spec = settings, spec
        self.tokenizer: Any = spec.tokenizer
        self.methods = spec.methods
        self.model_config = spec.model_config
        self.method_defaults = spec.method_defaults
        self.derived_defaults = spec.derived_defaults
        self.max_prompt_tokens = settings.max_prompt_tokens or settings.vllm_max_model_len or spec.max_prompt_tokens
        self.llm: Any = None
        self._installed = False
        self._inflight = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> VllmEngineClient:
        return cls(settings, Engine.weightless(settings.model, settings.model_config_name))

    async def start(self, install: bool = True) -> None:
        """Start vLLM (and, unless told not to, hook its workers: ``seeright bench`` times vLLM without them)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(engine_args(self.settings))
        if install:
            await self.install()

    async def install(self) -> None:
        """Put the head-scaling hooks into every worker (once)."""
        if not self._installed:
            await self.llm.collective_rpc("seeright_install")
            self._installed = True

    async def stop(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    @property
    def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored

    @property
    def depth(self) -> int:
        """Requests in flight (vLLM queues and batches them itself)."""
        return self._inflight

    def unavailable(self, name: str) -> str | None:
        """Why method ``name`` cannot run on this engine (or on this model), or None."""
        if name not in HOSTED:
            return (f"runs on the transformers engine only (seeright serve --engine transformers): it needs "
                    f"{'a second sequence decoded in lockstep' if self.methods[name].contrasts(self.methods[name].params_model()) else 'the attention probabilities of each row'}, "
                    f"which vLLM does not expose ({VLLM_ATTENTION_ISSUE})")
        return self.spec.unavailable(name)

    # ---- checks ------------------------------------------------------------------------------------
    def validate_interventions(self, interventions: dict[str, dict[str, Any]]) -> None:
        for name in sorted(set(interventions) & set(self.methods) - HOSTED):
            raise RequestError(f"interventions.{name}", f"not on the vLLM engine: {self.unavailable(name)}")
        resolved = self.spec.resolve_params(interventions)
        vhr = resolved.get("vhr")
        if vhr is not None and vhr.heads is None and self.settings.vllm_tensor_parallel_size > 1:
            raise RequestError("interventions.vhr.heads", "head selection reads all heads of a layer: with tensor "
                               "parallelism > 1 the vLLM engine takes fixed heads only")

    def validate(self, request: GenerationRequest) -> None:
        self.validate_interventions(request.interventions)
        self.spec.validate(request)

    async def check(self, request: GenerationRequest) -> None:
        self.validate(request)

    async def check_interventions(self, interventions: dict[str, dict[str, Any]]) -> None:
        self.validate_interventions(interventions)

    # ---- generation --------------------------------------------------------------------------------
    def _reserve(self, background: bool = False) -> None:
        """Take a slot; background work (evaluation jobs) leaves half of the queue to live traffic."""
        capacity = self.settings.queue_size + self.settings.max_batch_size
        if self._inflight >= (capacity - self.settings.queue_size // 2 if background else capacity):
            raise QueueFull
        self._inflight += 1

    def stream(self, request: GenerationRequest) -> VllmTokenStream:
        """Take a slot now (:class:`QueueFull` at capacity) and return the request's token stream."""
        self.validate(request)
        self._reserve()
        return VllmTokenStream(self, request)

    async def generate(self, request: GenerationRequest, wait_for_room: bool = False) -> GenerationOutput:
        """The request's output; with ``wait_for_room`` (evaluation jobs) it waits for a slot as the transformers
        engine's client does, backing off, leaving half the queue to live traffic."""
        self.validate(request)
        if wait_for_room:
            await when_room(lambda: self._reserve(background=True))
        else:
            self._reserve()
        stream = VllmTokenStream(self, request)
        async for _ in stream:
            pass
        assert stream.output is not None
        return stream.output

    def _prompt(self, request: GenerationRequest, images: bool = True) -> dict[str, Any]:
        """Token ids of the chat as the transformers engine builds it, one placeholder per image (vLLM expands
        them), with the images as multi-modal data."""
        turns = request.chat() if images else [t.without_images() for t in request.chat()]
        text = "".join(s.text for s in self.spec.adapter.segments(turns))
        prompt: dict[str, Any] = {"prompt_token_ids": self.tokenizer(text)["input_ids"]}
        if images and request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        return prompt

    def _sampling(self, request: GenerationRequest, extra: dict[str, Any] | None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        logprobs = request.top_logprobs if request.logprobs else None
        return SamplingParams(
            max_tokens=request.max_new_tokens, temperature=request.temperature, top_p=request.top_p,
            seed=request.seed, stop=list(request.stop) or None, logprobs=logprobs,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty, stop_token_ids=self.spec.eos_token_ids(),
            output_kind=RequestOutputKind.DELTA, extra_args={EXTRA_ARGS_KEY: extra} if extra else None,
        )

    async def _head_args(self, request: GenerationRequest) -> dict[str, Any] | None:
        """The worker's arguments for the request's VHR (after its text-only pass, when heads are selected)."""
        if "vhr" not in request.interventions:
            return None
        params: VHRParams = self.spec.resolve_params({"vhr": request.interventions["vhr"]})["vhr"]
        vhr: dict[str, Any] = {"alpha": params.alpha, "layers": params.layers, "prefill_positions": params.prefill_positions}
        if params.heads is not None:
            vhr["heads"] = {str(layer): heads for layer, heads in params.heads.items()}
            return {"vhr": vhr}
        key = uuid.uuid4().hex
        capture = self._sampling(GenerationRequest(max_new_tokens=1), {"capture": {"key": key, "layers": params.layers}})
        async for _ in self.llm.generate(self._prompt(request, images=False), capture, f"seeright-text-{key}"):
            pass
        vhr.update(text_key=key, outlier_filter=params.outlier_filter)
        return {"vhr": vhr}

    async def _outputs(self, prompt: dict[str, Any], sampling: Any) -> AsyncIterator[Any]:
        """vLLM's outputs of one request; a request vLLM refuses (a prompt too long for ``max_model_len``) is a 400."""
        try:
            async for out in self.llm.generate(prompt, sampling, f"seeright-{uuid.uuid4().hex}"):
                yield out
        except RequestError:
            raise
        except _client_errors() as exc:
            raise RequestError("messages", str(exc)) from exc

    async def _run(self, request: GenerationRequest, stream: VllmTokenStream) -> AsyncIterator[StreamedToken]:
        if self.llm is None:
            raise RuntimeError("the vLLM engine is not running")
        if request.interventions and not self._installed:
            raise RuntimeError("the vLLM workers are not hooked (start(install=True))")
        start = time.perf_counter()
        extra = await self._head_args(request)
        prompt = self._prompt(request)
        if extra is not None:  # never share prefix-cache blocks with requests computed under other edits
            fixed = "text_key" not in extra["vhr"]
            prompt["cache_salt"] = hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest() if fixed else uuid.uuid4().hex
        prepared = time.perf_counter()
        token_ids: list[int] = []
        logprobs: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        text, reason, prompt_tokens = "", "length", len(prompt["prompt_token_ids"])
        async for out in self._outputs(prompt, self._sampling(request, extra)):
            if out.prompt_token_ids is not None:
                prompt_tokens = len(out.prompt_token_ids)
            done = out.outputs[0]
            for i, token in enumerate(done.token_ids):
                streamed = _streamed(token, done.logprobs[i] if done.logprobs else None, request)
                token_ids.append(token)
                if request.logprobs:
                    logprobs.append(streamed.logprob)
                    tops.append(streamed.top or [])
                yield streamed
            text += done.text
            if done.finish_reason is not None:
                reason = "length" if done.finish_reason == "length" else "stop"
        end = time.perf_counter()
        stream.output = GenerationOutput(
            text=text, token_ids=token_ids, prompt_tokens=prompt_tokens, finish_reason=reason,
            timings={"prepare_s": prepared - start, "generate_s": end - prepared, "total_s": end - start},
            diagnostics={name: {"engine": "vllm"} for name in request.interventions},
            logprobs=logprobs if request.logprobs else None,
            top_logprobs=tops if request.logprobs and request.top_logprobs else None,
        )


def _client_errors() -> tuple[type[Exception], ...]:
    """The exceptions vLLM raises for a bad request (its ``VLLMClientError`` family, and plain ValueErrors)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # releases before the family existed raise ValueError
        return (ValueError,)
    return (VLLMClientError, ValueError)


def _streamed(token: int, step: dict[int, Any] | None, request: GenerationRequest) -> StreamedToken:
    """A token with its raw log-prob and the step's top tokens (vLLM's ``raw_logprobs``: before any sampling
    setting, as the transformers engine reports them), floored at ``MIN_LOGPROB``."""
    if not request.logprobs or step is None:
        return StreamedToken(token)
    floor = lambda v: max(float(v), MIN_LOGPROB)  # noqa: E731
    top = sorted(((tid, lp) for tid, lp in step.items() if lp.rank is not None and lp.rank <= request.top_logprobs),
                 key=lambda item: item[1].rank)
    return StreamedToken(token, floor(step[token].logprob), [(tid, floor(lp.logprob)) for tid, lp in top] if request.top_logprobs else None)
