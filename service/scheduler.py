"""Request queue and micro-batching.

Requests wait in a bounded queue; one worker thread takes the first, gathers more for up to
``batch_wait_s`` (at most ``max_batch_size``) and runs them as one batch, even when their interventions
differ (the engine applies methods per row). A full queue refuses new work at once (``QueueFull``)
instead of growing. A cancelled job (client gone) stops at its next token; a batch that fails is rerun
request by request (those that streamed nothing yet), so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.engine import Engine, GenerationOutput, GenerationRequest

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue is at capacity; the client should retry later."""


@dataclass
class Job:
    """One request waiting for, or in, a batch. Results are delivered on ``loop``."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    on_token: Callable[[int], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    emitted: int = 0

    def emit(self, token: int) -> None:
        self.emitted += 1
        if self.on_token is not None:
            self.loop.call_soon_threadsafe(self.on_token, token)

    def resolve(self, result: GenerationOutput | BaseException) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(result, asyncio.CancelledError):
                self.future.cancel()
            elif isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)


_STOP = object()


class Scheduler:
    """Owns the engine: only its worker thread runs model code."""

    def __init__(self, engine: Engine, max_batch_size: int = 8, batch_wait_s: float = 0.005, queue_size: int = 64) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.running = 0
        self.batches = 0
        self.cancelled = 0
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        """Requests waiting plus requests being generated."""
        return self.queue.qsize() + self.running

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="seeright-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued and running requests, then stop the worker."""
        if self._thread is None:
            return
        self.queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full as exc:
            raise QueueFull from exc

    # ---- worker ----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            first = self.queue.get()
            if first is _STOP:
                return
            batch, stop_after = [first], False
            deadline = time.perf_counter() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                try:
                    item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    break
                batch.append(item)
            self._run([job for job in batch if not job.cancelled.is_set()])
            for job in batch:
                if job.cancelled.is_set():
                    self.cancelled += 1
                    job.resolve(asyncio.CancelledError())
            if stop_after:
                self._drain()
                return

    def _drain(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._run([item])

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        self.running = len(batch)
        try:
            outputs = self.engine.generate_batch(
                [job.request for job in batch],
                on_token=lambda row, token: batch[row].emit(token),
                cancelled=lambda row: batch[row].cancelled.is_set(),
            )
            for job, out in zip(batch, outputs):
                job.resolve(out)
            self.batches += 1
        except Exception as exc:  # isolate the failing request: rerun the others one by one
            log.warning("batch of %d failed: %r", len(batch), exc)
            for job in batch:
                # a job that streamed tokens already cannot be replayed without repeating them
                if len(batch) == 1 or job.emitted:
                    job.resolve(exc)
                else:
                    self._run([job])
        finally:
            self.running = 0
