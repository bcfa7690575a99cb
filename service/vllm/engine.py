"""``VllmEngineClient``: the engine client of ``seeright serve --engine vllm``, on vLLM's ``AsyncLLM``.

It has the doors of :class:`seeright.service.client.EngineClient` (``validate``, ``generate``, ``stream``, the method
cards), so the OpenAI routes, streaming, usage, log-probs, limits, metrics, errors and evaluation jobs are the
same code on both engines. Prompts are built by a weightless copy of the transformers engine (the model on the
meta device: same chat template, same checks, same parameter resolution) and go to vLLM as token ids with
the images as multi-modal data; vLLM expands the image placeholders.

Requests without interventions run on vLLM unchanged. A request with interventions is admitted as on the
transformers engine (:meth:`~seeright.service.admission.Admission.admit`: binding, input rewriting, encoding,
analysis passes), with the passes run as vLLM requests (:mod:`seeright.service.vllm.passes`); its method states
then travel with it to the worker, which runs the methods' hooks on its rows (:mod:`seeright.service.vllm.worker`),
and come back with their diagnostics when it ends. The methods' vision-tower passes (a [CLS] token's attention, an
attack on the tower) run on the client's own copy of the tower and projector (:meth:`Engine.load_tower`, loaded when
the workers are hooked), with vLLM's engine held between two steps a step budget at a time
(:mod:`seeright.service.vllm.pauses`); where a method masks the tower's attention, the client computes the request's image
embeddings under the masks and vLLM takes them in place of its own tower's. What the engine does not host is a
400 that names the reason (:func:`not_hosted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import torch
from PIL import Image

from seeright import __version__
from seeright.interventions.adapters import ChatTurn, EncodedPrompt
from seeright.interventions.lora import Lora, LoraError
from seeright.interventions.methods.base import Answer, HookPoint, Method, RowState
from seeright.interventions.runtime import ForwardContext
from seeright.model_zoo import built_in, export_dir, resolve_model_path
from seeright.service.admission import row_loras
from seeright.service.engine import Engine, to_python
from seeright.service.requests import MIN_LOGPROB, GenerationOutput, GenerationRequest, RequestError, StreamedToken
from seeright.service.scheduler import QueueFull, when_room
from seeright.service.settings import Settings
from seeright.service.slicing import StepBudget
from seeright.service.vllm.candidates import guide_of, guide_refusal, guided
from seeright.service.vllm.layered import whole_until
from seeright.service.vllm.pacing import STEP_BUDGET_KEY
from seeright.service.vllm.passes import VllmPasses
from seeright.service.vllm.pauses import EnginePauses
from seeright.service.vllm.transport import EngineFailure, pack, pack_states, unpack_states
from seeright.service.vllm.worker import EXTRA_ARGS_KEY, prefill_tail, recomputed_from

T = TypeVar("T")
log = logging.getLogger(__name__)

WORKER_POINTS = frozenset({HookPoint.INPUT, HookPoint.ANALYSIS, HookPoint.HIDDEN, HookPoint.SCORES, HookPoint.PROBS, HookPoint.HEADS})
# run by the engine client: contrasts (a branch request and the worker's logits wrapper), vision masks (the client's
# tower), reflections (passes as vLLM requests once the answer is final), candidates (requests a chunk at a time)
CLIENT_POINTS = frozenset({HookPoint.LOGITS, HookPoint.VISION, HookPoint.REFLECT, HookPoint.CANDIDATES})


def not_hosted(method: Method, params: Any | None = None, *, tower: bool) -> str | None:
    """Why the vLLM engine cannot run ``method`` (with ``params``; at its defaults when None), or None; ``tower``:
    whether the engine client runs the model's vision tower itself (its adapter names the tower's modules)."""
    if (HookPoint.VISION in method.hook_points or method.tower_passes) and not tower:
        return ("it runs the vision tower on its own (analysis passes or masked tower attention), and this model's "
                "adapter does not name its tower's modules for the engine client to load: use the transformers engine")
    missing = method.hook_points - WORKER_POINTS - CLIENT_POINTS
    if missing:
        return f"the vLLM worker has no {sorted(p.value for p in missing)} hook point"
    return None


def vllm_folder(model_id: str) -> str:
    """A folder vLLM loads for ``model_id``: the folder or hub id itself, or, for a model seeright builds in code
    (the default ``seeright/shapes-smol``, the random test models), its export in the cache, written once per
    seeright version by :meth:`Engine.save_pretrained` (the vision tower in the hub layout vLLM reads)."""
    if not built_in(model_id):
        return resolve_model_path(model_id)
    folder = export_dir(model_id) / __version__
    if not (folder / "config.json").exists():
        partial = folder.with_name(f"{folder.name}.partial-{uuid.uuid4().hex[:8]}")
        Engine.from_pretrained(model_id).save_pretrained(partial)
        if folder.exists():  # another process exported it meanwhile
            shutil.rmtree(partial)
        else:
            partial.replace(folder)
    return str(folder)


def engine_args(settings: Settings, longest_prompt: int | None = None) -> Any:
    """vLLM's engine arguments: eager (the hooks run in Python), our worker extension, our scheduler (requests that
    must be prefilled whole start whole, a request and its contrast branch in the same step) and, with
    ``vllm_step_tokens``, chunked prefill under that per-step token budget; vLLM's own batch capacity
    (``max_num_batched_tokens``) stays large enough for ``longest_prompt`` beside a full batch of decoding rows, so a
    prompt that must run whole always can."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    max_len = settings.vllm_max_model_len
    longest = max(max_len or 0, longest_prompt or 0)
    capacity = max(longest + settings.max_batch_size, settings.vllm_step_tokens or 0, 2048) if longest else None
    step = settings.vllm_step_tokens
    return AsyncEngineArgs(
        model=vllm_folder(settings.model), served_model_name=[settings.name], dtype=settings.dtype,
        max_model_len=max_len, max_num_batched_tokens=capacity, max_num_seqs=settings.max_batch_size,
        enable_chunked_prefill=step is not None, max_num_scheduled_tokens=step,
        enforce_eager=True, block_size=settings.vllm_block_size,
        enable_mm_embeds=True,  # image embeddings from the client's tower, for methods that mask it
        tensor_parallel_size=settings.vllm_tensor_parallel_size,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization or (0.9 if torch.cuda.is_available() else 0.25),
        worker_extension_cls="seeright.service.vllm.worker.HookPoints", disable_log_stats=True,
        scheduler_cls="seeright.service.vllm.scheduling.seeright_scheduler",
        additional_config={} if step is None or settings.step_budget is None else {STEP_BUDGET_KEY: settings.step_budget},
        **lora_args(settings),
    )


MULTIPROCESSING_VARIABLE = "VLLM_ENABLE_V1_MULTIPROCESSING"  # vLLM's: "0" keeps a single worker in the engine core


def worker_in_engine_core(settings: Settings) -> None:
    """On a CPU with one worker, run vLLM's worker inside its engine-core process (its ``UniProcExecutor``).

    vLLM's CPU platform otherwise starts the worker as a process of its own, and the engine core waits for each
    step's result by spinning (``shm_broadcast.SpinCondition``): on a machine with few cores the spin takes a core
    from the model (``seeright bench --engine vllm`` measures both layouts on a CPU). The engine core stays a
    process of its own (``AsyncLLM`` always starts one), so the server's event loop never runs a step. A value the
    user set for ``VLLM_ENABLE_V1_MULTIPROCESSING`` is kept; GPUs and tensor parallelism are left as vLLM sets them."""
    if not torch.cuda.is_available() and settings.vllm_tensor_parallel_size == 1:
        os.environ.setdefault(MULTIPROCESSING_VARIABLE, "0")


def client_threads(settings: Settings) -> int | None:
    """Torch threads for the engine client's own work in the API process (the vision tower's passes and attacks):
    the setting, else 1 on a CPU, where vLLM's engine core computes on the same cores and a second pool of torch
    threads beside it slows both (``seeright bench --serving --engine vllm --joiners vemask`` measures it), else
    None (torch's default)."""
    if settings.vllm_client_threads is not None:
        return settings.vllm_client_threads
    return None if torch.cuda.is_available() else 1


RESERVED_CPU_VARIABLE = "VLLM_CPU_NUM_OF_RESERVED_CPU"  # vLLM's: cores its CPU workers leave to other processes


def engine_threads(settings: Settings) -> int | None:
    """Torch threads of vLLM's engine core on a CPU: the setting, else, where ``VLLM_CPU_NUM_OF_RESERVED_CPU`` is
    set, the cores this process may run on less that reserve (at least one), as vLLM's multiprocess CPU executor binds
    its worker's threads; else None (torch's default: every core; and on a GPU, vLLM's choice).

    With the worker in the engine core (:func:`worker_in_engine_core`) vLLM binds nothing. Leaving a core to the API
    process lowers the ratio of a running stream's longest gap to its median gap when a request joins, but on this
    2-core CPU not the longest gap itself: the median step grows instead, and a newcomer's prefill and the throughput
    under load pay for the core (``seeright bench --serving --engine vllm --engine-threads 1 2``; docs/engines.md)."""
    if settings.vllm_engine_threads is not None:
        return settings.vllm_engine_threads
    reserved = os.environ.get(RESERVED_CPU_VARIABLE)
    if torch.cuda.is_available() or not reserved:
        return None
    return max(1, len(os.sched_getaffinity(0)) - int(reserved))


@contextlib.contextmanager
def engine_core_threads(threads: int | None) -> Iterator[None]:
    """Start vLLM's engine core on ``threads`` torch threads: a forked process keeps this process's count, a spawned
    one reads ``OMP_NUM_THREADS``; both are restored when the engine core has started."""
    if threads is None:
        yield
        return
    before, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if variable is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = variable


def client_niceness(settings: Settings) -> int:
    """How far below the API process the engine client's own work runs: the setting, else 10 on a CPU (a running
    stream's steps then take the cores first while an admission's attack computes beside them), else 0."""
    if settings.vllm_client_niceness is not None:
        return settings.vllm_client_niceness
    return 0 if torch.cuda.is_available() else 10


def _lower_priority(niceness: int) -> None:
    """Thread initializer: this thread runs ``niceness`` below its process (Linux schedules each thread on its own
    niceness; where a thread's cannot be set, it is left as it is)."""
    if niceness:
        with contextlib.suppress(OSError, AttributeError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + niceness, 19))


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM 0.32 accepts


def lora_args(settings: Settings) -> dict[str, Any]:
    """vLLM's multi-LoRA settings when the server serves adapters (given at start, or loadable at run time): the
    smallest rank vLLM accepts at or above ``max_lora_rank``, ``max_adapters`` held in CPU memory, as many in one
    batch as it has rows."""
    if not settings.adapters and not settings.runtime_adapters:
        return {}
    rank = next((r for r in VLLM_LORA_RANKS if r >= settings.max_lora_rank), VLLM_LORA_RANKS[-1])
    return {"enable_lora": True, "max_lora_rank": rank, "max_loras": min(settings.max_adapters, settings.max_batch_size),
            "max_cpu_loras": settings.max_adapters}


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
        self.tower = bool(spec.adapter.tower_modules)  # the client loads the tower (and projector) at install
        self._installed = False
        self._pauses: EnginePauses | None = None  # the tower's work in turn with vLLM's steps (loaded at install)
        self._inflight = 0
        self._key = secrets.token_bytes(32)  # signs the method states the workers accept
        self._lora_ids: dict[Lora, int] = {}  # vLLM's id of each adapter loaded (a reload of a name gets a new one)
        self._adapter_lock = asyncio.Lock()
        self._own_work = ThreadPoolExecutor(thread_name_prefix="seeright-client", initializer=_lower_priority,
                                            initargs=(client_niceness(settings),))  # admissions, reflections
        for name, path in settings.adapters.items():
            self._add_lora(name, str(path))

    @classmethod
    def from_settings(cls, settings: Settings) -> VllmEngineClient:
        return cls(settings, Engine.weightless(vllm_folder(settings.model), settings.model_config_name))

    # ---- LoRA adapters -----------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, Lora]:
        """The LoRA adapters being served, by name (checked against the model's shapes; vLLM loads their weights)."""
        return self.spec.loras

    def _add_lora(self, name: str, path: str) -> None:
        lora = self.spec.load_lora(name, path, self.settings.max_lora_rank)  # the checks, on meta tensors: no weights kept
        self._lora_ids[lora] = len(self._lora_ids) + 1

    async def load_adapter(self, name: str, path: str, max_rank: int, max_adapters: int) -> None:
        """Check a PEFT LoRA folder and serve it as model ``name``; vLLM reads its weights on first use."""
        async with self._adapter_lock:
            if name not in self.adapters and len(self.adapters) >= max_adapters:
                raise LoraError("lora_name", f"{max_adapters} adapters are loaded (this server's max_adapters); unload one first")
            await asyncio.to_thread(self._add_lora, name, path)

    async def unload_adapter(self, name: str) -> None:
        """Stop serving ``name``; requests already running keep it (vLLM's adapter cache evicts it when it needs room)."""
        async with self._adapter_lock:
            self.spec.unload_lora(name)

    def _lora_request(self, lora: Lora | None) -> Any:
        from vllm.lora.request import LoRARequest

        return None if lora is None else LoRARequest(lora.name, self._lora_ids[lora], lora.path)

    async def start(self, install: bool = True) -> None:
        """Start vLLM (and, unless told not to, hook its workers: ``seeright bench`` times vLLM without them)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        worker_in_engine_core(self.settings)
        with engine_core_threads(engine_threads(self.settings)):
            self.llm = AsyncLLM.from_engine_args(engine_args(self.settings, self.max_prompt_tokens))
        if (threads := client_threads(self.settings)) is not None:  # (the engine core has started: its own)
            torch.set_num_threads(threads)
        if install:
            await self.install()

    async def install(self) -> None:
        """Put the hook points into every worker (once); admission's passes become vLLM requests."""
        if not self._installed:
            await self.llm.collective_rpc("seeright_install", args=(self._key,))
            if not isinstance(self.spec.passes, VllmPasses):  # the tower and passes once
                if self.tower:
                    await asyncio.to_thread(self.spec.load_tower, self.settings.device, self.settings.dtype)
                    if self.settings.step_budget is not None:
                        self._pauses = EnginePauses(self.llm, asyncio.get_running_loop(),
                                                    StepBudget(self.settings.step_budget), self.spec.adapter,
                                                    self.spec.runtime)
                self.spec.passes = VllmPasses(
                    self.spec.encode, self.spec.decode_text, self.spec.info, self.spec.eos_token_ids(), self._pass,
                    asyncio.get_running_loop(), self.spec.adapter if self.tower else None,
                    None if self._pauses is None else self._pauses.let_go, self.spec.runtime.reached,
                )
            self._installed = True

    async def uninstall(self) -> None:
        """Take the hook points out of every worker (``seeright bench`` measures vLLM with and without them in
        turn); requests with interventions are refused until :meth:`install`. Call it with none running."""
        if self._installed:
            await self.llm.collective_rpc("seeright_uninstall")
            self._installed = False

    async def stop(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        self._own_work.shutdown(wait=False)
        if self._pauses is not None:
            self._pauses.close()
            self._pauses = None

    async def _on_own_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on one of the engine client's own threads (below the engine core's priority: ``_own_work``),
        in this task's context, as :func:`asyncio.to_thread` runs it on the default executor's."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._own_work, partial(context.run, fn, *args))

    @property
    def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored

    @property
    def depth(self) -> int:
        """Requests in flight (vLLM queues and batches them itself)."""
        return self._inflight

    def unavailable(self, name: str) -> str | None:
        """Why method ``name`` cannot run on this engine (or on this model) at its defaults, or None."""
        return not_hosted(self.methods[name], tower=self.tower) or self.spec.unavailable(name)

    # ---- checks ------------------------------------------------------------------------------------
    def validate_interventions(self, interventions: dict[str, dict[str, Any]]) -> None:
        resolved = self.spec.resolve_params(interventions)
        for name, params in resolved.items():
            reason = not_hosted(self.methods[name], params, tower=self.tower)
            if reason is not None:
                raise RequestError(f"interventions.{name}", f"not on the vLLM engine: {reason}")
        if (refused := guide_refusal(self.methods, list(resolved))) is not None:
            raise RequestError(*refused)
        if resolved and self.settings.vllm_tensor_parallel_size > 1:
            raise RequestError("interventions", "the methods read every head of a layer: with tensor parallelism > 1 "
                               "the vLLM engine runs requests without interventions only")

    def refusal(self, name: str, given: dict[str, Any]) -> str | None:
        """Why this engine refuses ``interventions.name`` with the ``given`` parameters (its 400's text), or None."""
        try:
            self.validate_interventions({name: given})
        except RequestError as exc:
            return str(exc)
        return None

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

    def _prompt(self, turns: list[ChatTurn], images: Sequence[Image.Image]) -> dict[str, Any]:
        """Token ids of the chat as the transformers engine builds it, one placeholder per image (vLLM expands
        them), with the images as multi-modal data."""
        text = "".join(s.text for s in self.spec.adapter.segments(turns))
        prompt: dict[str, Any] = {"prompt_token_ids": self.tokenizer(text)["input_ids"]}
        if images:
            prompt["multi_modal_data"] = {"image": list(images)}
        return prompt

    def _with_states(
        self, prompt: dict[str, Any], states: Sequence[RowState], key: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """A key for the request's states (``key``, or a new one) and the worker's arguments; the prompt gets a salt of
        its own, so that it never shares prefix-cache blocks with requests computed under other edits (nor reads
        cached ones)."""
        key = key or uuid.uuid4().hex
        prompt["cache_salt"] = key
        layers = range(self.spec.info.num_layers)
        args = {"key": key, "states": pack_states(states, self._key), "tail": prefill_tail(states, layers)}
        if (first := recomputed_from(states, layers)) is not None:
            args["recomputed"] = first  # the scheduler's pace costs the rows from there on apart
        return key, args

    async def _collect(self, key: str, sent: Sequence[RowState]) -> tuple[list[RowState], dict[str, Any]]:
        """The request's states as the worker's hooks left them, with the request inputs of the ``sent`` states
        they were packed from (:func:`pack_states` leaves them behind), and the worker's status (a guided-decoding
        candidate's ``sampler``); :class:`EngineFailure` if they failed."""
        payload = (await self.llm.collective_rpc("seeright_collect", args=(key,)))[0]
        if payload is None:
            raise EngineFailure("the vLLM worker kept no states for this request")
        status, *states = unpack_states(payload, self._key)
        if status.data["error"] is not None:
            raise EngineFailure(f"the vLLM worker could not run this request's methods exactly: {status.data['error']}")
        for back, state in zip(states, sent):
            back.request = state.request
        return states, status.data

    async def _release(self, keys: Sequence[str]) -> None:
        """Drop finished guided-decoding candidates' keys and values in the workers."""
        if keys:
            await self.llm.collective_rpc("seeright_release", args=(list(keys),))

    async def _pass(self, turns: list[ChatTurn], images: list[Image.Image], states: Sequence[RowState],
                    max_tokens: int) -> tuple[list[int], list[RowState]]:
        """A method's extra pass (:class:`VllmPasses`): a greedy request carrying ``states``; its tokens and the
        states as the worker left them."""
        prompt = self._prompt(turns, images)
        key, extra = self._with_states(prompt, states)
        sampling = self._sampling(GenerationRequest(max_new_tokens=max_tokens), extra)
        tokens: list[int] = []
        async for out in self._outputs(prompt, sampling, row_loras([states])[0]):
            tokens.extend(out.outputs[0].token_ids)
        return tokens, (await self._collect(key, states))[0]

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

    async def _outputs(self, prompt: dict[str, Any], sampling: Any, lora: Lora | None) -> AsyncIterator[Any]:
        """vLLM's outputs of one request (on ``lora``, if given); a request vLLM refuses (a prompt too long for
        ``max_model_len``) is a 400."""
        try:
            async for out in self.llm.generate(prompt, sampling, f"seeright-{uuid.uuid4().hex}",
                                               lora_request=self._lora_request(lora)):
                yield out
        except RequestError:
            raise
        except _client_errors() as exc:
            raise RequestError("messages", str(exc)) from exc

    def _branch(self, states: Sequence[RowState], prompt: dict[str, Any], extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The contrast branch of a request with these states and vLLM ``prompt``, if one asks for it: the branch's
        vLLM prompt and worker arguments; ``extra`` (the request's worker arguments) gets the branch's key, which
        both carry (the scheduler pairs them by it). A branch is the chat and images its method encoded it from,
        or, where the method edits the pixels, the request's own prompt with image ids of its own (vLLM's encoder
        and prefix caches must not hand it the request's) and the signed state the worker edits its pixels with.
        The branch prompt leaves the states."""
        contrast = next((s for s in states if "contrast_prompt" in s.data), None)
        if contrast is None:
            return None
        encoded = contrast.data.pop("contrast_prompt")
        key = uuid.uuid4().hex
        extra["branch"] = key
        args: dict[str, Any] = {"branch": key}
        if not contrast.hooks.branch_from_pixels:
            return self._prompt(*self.spec.passes.source(encoded)), args
        branch = dict(prompt)
        images = len(prompt.get("multi_modal_data", {}).get("image", []))
        branch["multi_modal_uuids"] = {"image": [f"seeright-branch-{key}-{i}" for i in range(images)]}
        args["pixels"] = pack_states([contrast], self._key)
        return branch, args

    def _admit(self, request: GenerationRequest,
               lora: Lora | None) -> tuple[Any, list[RowState], torch.Tensor | None, bool]:
        """Admission (a thread's work): the admitted request, its states, its image embeddings where a method
        masks the vision tower or its prompt is prefilled layer by layer first (:meth:`_image_embeddings`), and
        whether it is (:meth:`_layers_first`)."""
        with self._pauses.sliced() if self._pauses is not None else contextlib.nullcontext():
            inputs, rows = self.spec.admit([request])
            states = rows[0]
            for state in states:
                state.layout = inputs[0].prompt.layout
            layered = self._layers_first(states, inputs[0].prompt, lora)
            return inputs[0], states, self._image_embeddings(states, inputs[0].prompt, unmasked=layered), layered

    def _layers_first(self, states: Sequence[RowState], prompt: EncodedPrompt, lora: Lora | None) -> bool:
        """Whether the request's prompt runs layer by layer in the workers before vLLM prefills it
        (:mod:`seeright.service.vllm.layered`): where a hook edits every prompt row by the last (the prompt would
        otherwise run in one forward) and the others may split it, but in guided decoding; while requests run (whose
        streams a whole prefill would freeze), with the step budget on, for a request without an adapter (vLLM sets
        the adapters' rows per forward) whose images the client can embed (its tower)."""
        layers = range(self.spec.info.num_layers)
        others = [s for s in states if whole_until([s], layers) is None]
        return (self.settings.step_budget is not None and lora is None and guide_of(states) is None
                and whole_until(states, layers) is not None
                and (not others or prefill_tail(others, layers) > 0)
                and (self.tower or "pixel_values" not in prompt.images)
                and self.llm.get_num_unfinished_requests() > 0)

    async def _layered(self, prompt: EncodedPrompt, states: list[RowState],
                       images: torch.Tensor | None) -> list[RowState]:
        """The request's states after a layered prefill of its prompt in the workers
        (:mod:`seeright.service.vllm.layered`): the states whose hooks edit every prompt row by the last hold what they
        chose there (each row's edit is then its own, and vLLM may split the prompt), the others are as they were.
        Where the workers cannot run it, the states as they were: the prompt runs in one forward."""
        key = uuid.uuid4().hex
        begin: dict[str, Any] | None = {
            "ids": prompt.input_ids.flatten().tolist(), "states": pack_states(states, self._key),
            "images": None if images is None else pack(images, self._key),
        }
        try:
            while True:
                args = (key, begin, self.settings.step_budget)
                answer = (await self.llm.collective_rpc("seeright_layered", args=args))[0]
                begin = None
                if "error" in answer:
                    log.warning("a layered prefill could not run (the prompt runs in one forward): %s", answer["error"])
                    return states
                if "states" in answer:
                    break
        except BaseException:
            if self.llm is not None:
                with contextlib.suppress(Exception):
                    await self.llm.collective_rpc("seeright_layered", args=(key, None, None, True))
            raise
        layers = range(self.spec.info.num_layers)
        settled = unpack_states(answer["states"], self._key)
        for back, state in zip(settled, states):
            back.request = state.request
        return [back if whole_until([state], layers) is not None else state for back, state in zip(settled, states)]

    def _image_embeddings(self, states: Sequence[RowState], prompt: EncodedPrompt,
                          unmasked: bool = False) -> torch.Tensor | None:
        """Where the request's methods mask the vision tower's attention (:meth:`Hooks.vision_mask`), its images'
        embeddings ``[n_images, image tokens, hidden]`` from the client's tower and projector under those masks
        (the adapter's own masking, as the transformers engine's prefill applies it); vLLM takes them in place of
        its own tower's. Where no method masks, the tower's own embeddings with ``unmasked`` (a layered prefill's,
        which vLLM then takes too), else None."""
        pixels = prompt.images.get("pixel_values")
        if pixels is None:
            return None
        masks = ForwardContext([list(states)], image_counts=[pixels.shape[0]]).vision_masks()
        if not masks and not unmasked:
            return None
        adapter = self.spec.adapter
        handles = [h for target, keep in masks.items() for h in adapter.mask_vision_attention(keep, target)]
        try:
            return adapter.image_features(pixels).cpu()
        finally:
            for handle in handles:
                handle.remove()

    def _reflect(self, states: Sequence[RowState], answer: Answer) -> None:
        """The methods' passes once the request's ``answer`` is final (:attr:`HookPoint.REFLECT`; AGSER's
        sub-queries), as vLLM requests through the passes (a thread's work: they wait on the event loop)."""
        with torch.inference_mode():
            for state in states:
                if HookPoint.REFLECT in state.hooks.hook_points:
                    state.hooks.reflect([state], self.spec.passes, [answer])

    async def _start_branch(self, prompt: dict[str, Any], args: dict[str, Any], request: GenerationRequest,
                            lora: Lora | None) -> str:
        """Queue a contrast branch (vLLM holds it until its request arrives); its vLLM request id. It runs without
        methods and greedy (the worker gives it its request's tokens), and stops with its request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = SamplingParams(max_tokens=request.max_new_tokens, temperature=0.0, detokenize=False,
                                  stop_token_ids=self.spec.eos_token_ids(), output_kind=RequestOutputKind.FINAL_ONLY,
                                  extra_args={EXTRA_ARGS_KEY: args})
        request_id = f"seeright-branch-{args['branch']}"
        try:
            await self.llm.add_request(request_id, prompt, sampling, lora_request=self._lora_request(lora))
        except _client_errors() as exc:
            raise RequestError("messages", f"its contrast branch: {exc}") from exc
        return request_id

    async def _run(self, request: GenerationRequest, stream: VllmTokenStream) -> AsyncIterator[StreamedToken]:
        if self.llm is None:
            raise RuntimeError("the vLLM engine is not running")
        if request.interventions and not self._installed:
            raise RuntimeError("the vLLM workers are not hooked (start(install=True))")
        start = time.perf_counter()
        key, extra, states, branch = None, None, [], None
        lora = self.spec.lora_of(request)  # read once: an unload while it runs leaves it its adapter
        if request.interventions:
            admitted, states, embeddings, layered = await self._on_own_thread(self._admit, request, lora)
            if guide_of(states) is not None:
                async for token in guided(self, request, stream, admitted, states, lora, start):
                    yield token
                return
            prompt = self._prompt(admitted.turns, admitted.images)
            extra = {}
            contrast = self._branch(states, prompt, extra)
            if embeddings is not None:  # the branch, if any, keeps the images (a contrast branch is unedited)
                prompt["multi_modal_data"] = {"image": embeddings}
            if layered:
                states = await self._layered(admitted.prompt, states, embeddings)
            key, packed = self._with_states(prompt, states)
            extra.update(packed)
            if contrast is not None:
                if extra["tail"] == 0:  # a request prefilled whole: its branch too, in the same step
                    contrast[1]["tail"] = 0
                branch = await self._start_branch(*contrast, request, lora)
        else:
            prompt = self._prompt(request.chat(), request.images)
        try:
            async for token in self._decode(request, stream, prompt, states, extra, key, lora, start):
                yield token
        finally:
            if branch is not None and self.llm is not None:  # (None: the engine stopped meanwhile)
                await self.llm.abort(branch)

    async def _decode(self, request: GenerationRequest, stream: VllmTokenStream, prompt: dict[str, Any],
                      states: Sequence[RowState], extra: dict[str, Any] | None, key: str | None, lora: Lora | None,
                      start: float) -> AsyncIterator[StreamedToken]:
        """Stream the request's tokens from vLLM and set ``stream.output`` (with its methods' diagnostics)."""
        prepared = time.perf_counter()
        token_ids: list[int] = []
        logprobs: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        text, reason, prompt_tokens = "", "length", len(prompt["prompt_token_ids"])
        async for out in self._outputs(prompt, self._sampling(request, extra), lora):
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
        diagnostics = {}
        if key is not None:
            states = (await self._collect(key, states))[0]
            if any(HookPoint.REFLECT in s.hooks.hook_points for s in states):
                await self._on_own_thread(self._reflect, states, Answer(token_ids, text, request.max_new_tokens))
            diagnostics = {s.hooks.name: {**to_python(s.diagnostics), **self.spec.provenance(s)} for s in states}
        end = time.perf_counter()
        stream.output = GenerationOutput(
            text=text, token_ids=token_ids, prompt_tokens=prompt_tokens, finish_reason=reason,
            timings={"prepare_s": prepared - start, "generate_s": end - prepared, "total_s": end - start},
            diagnostics=diagnostics,
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
