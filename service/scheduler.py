"""Request queue and iteration-level (continuous) batching.

Requests wait in a bounded queue. One worker thread owns the engine: between decoding steps it admits
waiting requests into the running batch (up to ``max_batch_size`` rows; their prefill runs as one forward
of the newcomers), then runs one decode step for every running row; a row leaves as soon as it finishes
or its client goes, and its cache rows are freed at once (``service.batching.RunningBatch``). So a short
request never waits for a long one to finish. When nothing runs, the worker waits for a request and
gathers more for up to ``batch_wait_s`` so that a burst is prefilled together. A full queue refuses new
work at once (``QueueFull``). A request that fails at admission fails alone (the others of its admission
batch are admitted one by one); a decode step that fails fails the rows running in it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.batching import Row, RunningBatch
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
            self._deliver(self.on_token, token)

    def _deliver(self, callback: Callable, *args: object) -> None:
        """Run ``callback`` on the job's loop; a loop that has gone (its client left) takes nothing."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed
            self.cancelled.set()

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

        self._deliver(settle)


_STOP = object()


class Scheduler:
    """Owns the engine: only its worker thread runs model code."""

    def __init__(self, engine: Engine, max_batch_size: int = 8, batch_wait_s: float = 0.005, queue_size: int = 64) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.running = 0
        self.batches = 0  # admission batches: newcomers prefilled together
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
        batch, jobs, stopping = RunningBatch(self.engine), {}, False
        while True:
            newcomers, stop_seen = self._waiting(self.max_batch_size - len(batch), idle=not len(batch) and not stopping)
            stopping |= stop_seen
            live = [job for job in newcomers if not self._dropped(job)]
            if live:
                self._admit(batch, live, jobs)
            if len(batch):
                self._step(batch, jobs)
            elif stopping and self.queue.empty():
                self.running = 0
                return
            self.running = len(batch)

    def _waiting(self, room: int, idle: bool) -> tuple[list[Job], bool]:
        """Jobs to admit now: when idle, wait for one and gather a burst for ``batch_wait_s``; otherwise
        take only what is already queued (decoding does not wait)."""
        taken: list[Job] = []
        deadline = time.perf_counter() + self.batch_wait_s
        while len(taken) < room:
            try:
                if idle and not taken:
                    item = self.queue.get()
                elif idle:
                    item = self.queue.get(timeout=max(deadline - time.perf_counter(), 0) or 1e-9)
                else:
                    item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return taken, True
            taken.append(item)
        return taken, False

    def _dropped(self, job: Job) -> bool:
        if job.cancelled.is_set():
            self.cancelled += 1
            job.resolve(asyncio.CancelledError())
            return True
        return False

    def _admit(self, batch: RunningBatch, newcomers: list[Job], jobs: dict[int, Job]) -> None:
        """Prefill ``newcomers`` into the batch; a failing admission is retried job by job."""
        try:
            rows = batch.admit(
                [job.request for job in newcomers], on_token=[job.emit for job in newcomers],
                cancelled=[job.cancelled.is_set for job in newcomers],
            )
        except Exception as exc:  # isolate the failing request
            log.warning("admission of %d failed: %r", len(newcomers), exc)
            if len(newcomers) == 1:
                newcomers[0].resolve(exc)
            else:
                for job in newcomers:
                    self._admit(batch, [job], jobs)
            return
        self.batches += 1
        for job, row in zip(newcomers, rows):
            jobs[id(row)] = job
            if row.reason is not None:  # finished with its first token
                self._finish(batch, row, jobs)

    def _step(self, batch: RunningBatch, jobs: dict[int, Job]) -> None:
        try:
            finished = batch.step()
        except Exception as exc:  # the rows of a failed step cannot be replayed: they fail together
            log.warning("decode step of %d rows failed: %r", len(batch), exc)
            for row in batch.rows:
                jobs.pop(id(row)).resolve(exc)
            batch.clear()
            return
        for row in finished:
            self._finish(batch, row, jobs)

    def _finish(self, batch: RunningBatch, row: Row, jobs: dict[int, Job]) -> None:
        job = jobs.pop(id(row))
        if row.reason == "cancelled":
            self.cancelled += 1
            job.resolve(asyncio.CancelledError())
        else:
            job.resolve(batch.output(row))
