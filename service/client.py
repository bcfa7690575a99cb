"""``EngineClient``: the one async door to the engine, for HTTP routes and evaluation jobs alike.

``await client.generate(request)`` returns the output; ``async for token in client.stream(request)``
yields each :class:`~seeright.service.engine.StreamedToken` (id, and log-probs when asked) as it is generated, and ``stream.output`` holds the output once the loop ends.
Cancelling the awaiting task (or leaving the loop early) cancels the request in the scheduler. Behind the
client is the scheduler's worker thread, which runs all model code (admissions in a thread of their own, in
turn with its decode steps, never beside them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from seeright.interventions.lora import Lora, LoraError
from seeright.service.requests import GenerationOutput, GenerationRequest, StreamedToken
from seeright.service.scheduler import Job, Scheduler, when_room


class TokenStream:
    """Tokens of one queued request as they come; ``output`` is set when iteration ends normally, and
    iteration raises the request's error if it failed."""

    def __init__(self, request: GenerationRequest) -> None:
        loop = asyncio.get_running_loop()
        self._tokens: asyncio.Queue[StreamedToken] = asyncio.Queue()
        self.job = Job(request, loop, loop.create_future(), self._tokens.put_nowait)
        self.output: GenerationOutput | None = None

    def cancel(self) -> None:
        self.job.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[StreamedToken]:
        job, tokens = self.job, self._tokens
        try:
            while not job.future.done() or not tokens.empty():
                getter = asyncio.ensure_future(tokens.get())
                await asyncio.wait({getter, job.future}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            self.output = job.future.result()
        except (asyncio.CancelledError, GeneratorExit):
            self.cancel()
            raise


class EngineClient:
    """Async generation on top of a :class:`Scheduler`, plus what callers may read of the engine."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        engine = scheduler.engine
        self.tokenizer: Any = engine.tokenizer
        self.methods = engine.methods
        self.model_config = engine.model_config
        self.method_defaults = engine.method_defaults
        self.derived_defaults = engine.derived_defaults
        self.unavailable = engine.unavailable
        self._adapter_lock = asyncio.Lock()

    @property
    def adapters(self) -> dict[str, Lora]:
        """The LoRA adapters being served, by name."""
        return self._scheduler.engine.loras

    async def load_adapter(self, name: str, path: str, max_rank: int, max_adapters: int) -> None:
        """Read a PEFT LoRA folder (off the event loop) and serve it as model ``name``; a
        :class:`~seeright.interventions.lora.LoraError` names what is wrong."""
        async with self._adapter_lock:  # one load at a time: two of one name must not both pass the name check
            if name not in self.adapters and len(self.adapters) >= max_adapters:
                raise LoraError("lora_name", f"{max_adapters} adapters are loaded (this server's max_adapters); unload one first")
            await asyncio.to_thread(self._scheduler.engine.load_lora, name, path, max_rank)

    async def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name`` (KeyError if none); requests already admitted finish with it."""
        async with self._adapter_lock:
            self._scheduler.engine.unload_lora(name)

    @property
    def max_prompt_tokens(self) -> int | None:
        """The longest prompt the engine takes, in tokens (images included)."""
        return self._scheduler.engine.max_prompt_tokens

    async def start(self) -> None:
        self._scheduler.start()

    async def stop(self) -> None:
        self._scheduler.stop()  # drains queued and running requests before exit

    @property
    def alive(self) -> bool:
        """Whether the scheduler's worker thread runs (health checks)."""
        return self._scheduler.alive

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self._scheduler.depth

    def validate(self, request: GenerationRequest) -> None:
        """Raise :class:`~seeright.service.engine.RequestError` for a request the engine would refuse."""
        self._scheduler.engine.validate(request)

    def validate_interventions(self, interventions: dict[str, dict[str, Any]]) -> None:
        """Raise :class:`~seeright.service.engine.RequestError` for parameters the engine would refuse."""
        self._scheduler.engine.resolve_params(interventions)

    async def check(self, request: GenerationRequest) -> None:
        """:meth:`validate` behind the async door that evaluation jobs use (a remote pool's goes over the network)."""
        self.validate(request)

    async def check_interventions(self, interventions: dict[str, dict[str, Any]]) -> None:
        """:meth:`validate_interventions` behind the async door."""
        self.validate_interventions(interventions)

    def submit(self, job: Job, background: bool = False) -> None:
        """Queue a job; :class:`QueueFull` when the queue is at capacity (for ``background`` work, half of it)."""
        self._scheduler.submit(job, background)

    async def generate(self, request: GenerationRequest, wait_for_room: bool = False) -> GenerationOutput:
        """The request's output. A full queue raises :class:`QueueFull`; with ``wait_for_room`` (background work
        such as evaluation jobs, which yields to live traffic) it waits, backing off, until half the queue is free."""
        loop = asyncio.get_running_loop()
        job = Job(request, loop, loop.create_future())
        if wait_for_room:
            await when_room(lambda: self.submit(job, background=True))
        else:
            self.submit(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    def stream(self, request: GenerationRequest) -> TokenStream:
        """Queue the request now (:class:`QueueFull` at capacity) and return its token stream."""
        stream = TokenStream(request)
        self.submit(stream.job)
        return stream
