"""Request queue and iteration-level (continuous) batching.

Requests wait in a bounded queue. One worker thread owns the engine: between decoding steps it admits
waiting requests into the running batch (up to ``max_batch_size`` rows; their prefill runs as one forward
of the newcomers, or one per row while rows decode under a step budget; while rows decode, at most one
newcomer whose methods run extra passes is admitted at a time), then runs one decode step for every running
row; a row leaves as soon as it finishes or its client goes, and its cache rows are freed at once (``seeright.service.batching.RunningBatch``). So a short request
never waits for a long one to finish. With ``step_budget`` (on by default), work that starts while rows decode
(an admission; a finished request's reflection passes) runs a slice per decode step, paused between blocks of
the model in the slicer's thread (``seeright.service.slicing``): a running row's longest gap between tokens is
bounded by one slice, whatever joins, and the output is what whole work gives. When nothing runs, the worker
waits for a request and gathers more for up to ``batch_wait_s`` so that a burst is prefilled together. A full
queue refuses new work at once (``QueueFull``). With ``max_kv_tokens``, a prepared request joins only when the
cache slots the running rows may still grow to (prompt plus whole token budget each) leave room for its own; it
waits until then, and one that could never fit gets a ``RequestError`` naming ``max_tokens`` (a 400). A request
that fails at admission fails alone (the others of its admission batch are admitted one by one); a decode step
that fails fails the rows running in it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from seeright.interventions.methods.base import HookPoint
from seeright.service.batching import Joined, Prefilled, Row, RunningBatch
from seeright.service.engine import Engine
from seeright.service.requests import GenerationOutput, GenerationRequest, RequestError, StreamedToken
from seeright.service.slicing import DEFAULT_STEP_BUDGET, UNBOUNDED, Slice, SlicedCall, Slicer, StepBudget

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue is at capacity; the client should retry later."""


@dataclass
class Job:
    """One request waiting for, or in, a batch. Results are delivered on ``loop``."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    on_token: Callable[[StreamedToken], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, token: StreamedToken) -> None:
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


KV_MEMORY_SHARE = 0.5  # of the memory free at start, for ``max_kv_tokens: auto``


def kv_bytes_per_token(engine: Engine) -> int:
    """Bytes one cached token takes: keys and values of every layer's KV heads."""
    info = engine.info
    return 2 * info.num_layers * info.num_kv_heads * info.head_dim * torch.finfo(engine.dtype).bits // 8


def free_memory(device: torch.device) -> int:
    """Bytes free now on ``device`` (on a CPU: the machine's available memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_kv_budget(engine: Engine, share: float = KV_MEMORY_SHARE) -> int:
    """``max_kv_tokens: auto``: a share of the free memory, in cached tokens of this model."""
    return max(1, int(share * free_memory(engine.device)) // kv_bytes_per_token(engine))


BACKOFF_S = (0.1, 2.0)  # background work waiting for room: first and longest wait between tries


async def when_room(submit: Callable[[], None]) -> None:
    """Call ``submit`` until it does not raise :class:`QueueFull`, waiting twice as long after each refusal."""
    delay = BACKOFF_S[0]
    while True:
        try:
            submit()
            return
        except QueueFull:
            await asyncio.sleep(delay)
            delay = min(2 * delay, BACKOFF_S[1])


class Scheduler:
    """Owns the engine: its worker thread runs all model code, admissions and reflections in its slicer's thread
    in turn with its decode steps (never beside them)."""

    def __init__(
        self, engine: Engine, max_batch_size: int = 8, batch_wait_s: float = 0.005, queue_size: int = 64,
        max_kv_tokens: int | Literal["auto"] | None = None, step_budget: StepBudget | None = DEFAULT_STEP_BUDGET,
        timeline: Callable[[str, float, float], None] | None = None,
    ) -> None:
        self.engine = engine
        # called from the worker thread with ("work", start, end) for each turn of newcomer work (an admission's or a
        # reflection's slice) and ("step", start, end) for each decode step (time.perf_counter()): the serving
        # benchmark's account of what a running stream's longest gap held
        self.timeline = timeline
        self.step_budget = step_budget
        self.decode_s: float | None = None  # moving average of an undisturbed decode step's time (``_timed``)
        self._decode_rows = 0  # the batch's rows at its last sample
        self._slicer: Slicer | None = None  # the worker's, while it runs
        self._finishing: list[Finishing] = []  # finished requests whose reflection passes run a slice per step
        self.max_batch_size = max_batch_size
        self.max_kv_tokens = auto_kv_budget(engine) if max_kv_tokens == "auto" else max_kv_tokens
        self.batch_wait_s = batch_wait_s
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.running = 0
        self.batches = 0  # admissions that joined rows to the batch
        self.cancelled = 0
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        """Requests waiting plus requests being generated."""
        return self.queue.qsize() + self.running

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="seeright-scheduler", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (health checks)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued and running requests, then stop the worker."""
        if self._thread is None:
            return
        self.queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def submit(self, job: Job, background: bool = False) -> None:
        """Queue ``job``; :class:`QueueFull` at capacity, or for ``background`` work (evaluation jobs) once half the
        queue is taken: the other half stays for live traffic."""
        if background and self.queue.qsize() >= self.queue.maxsize // 2:
            raise QueueFull
        try:
            self.queue.put_nowait(job)
        except queue.Full as exc:
            raise QueueFull from exc

    # ---- worker ----------------------------------------------------------------------------------
    def _work(self) -> None:
        self._slicer, self._finishing = Slicer(self.engine.adapter, self.engine.runtime), []
        batch, jobs, prepared, held, stopping = RunningBatch(self.engine), {}, [], [], False
        admission: Admission | None = None
        try:
            while True:
                try:
                    busy = (len(batch) + len(prepared) + len(held) + len(self._finishing)
                            + (admission.size if admission is not None else 0))
                    newcomers, stop_seen = self._waiting(self.max_batch_size - busy, idle=not busy and not stopping)
                    stopping |= stop_seen
                    held = [job for job in held + newcomers if not self._dropped(job)]
                    prepared = self._not_cancelled(prepared, jobs)
                    if admission is None:
                        admission, prepared, held = self._admission(batch, prepared, held, jobs)
                    disturbed = admission is not None or bool(self._finishing)  # newcomer work runs before this step
                    started = time.perf_counter()
                    waiting = self._newcomer_work(batch, admission, jobs)
                    if disturbed and self.timeline is not None:
                        self.timeline("work", started, time.perf_counter())
                    if waiting is not None:
                        prepared, admission = prepared + waiting, None
                    if len(batch):
                        self._step(batch, jobs, disturbed)
                except Exception as exc:  # a bug must not kill the worker: fail what it held, keep serving
                    log.exception("scheduler loop failed")
                    for pending in [*([admission] if admission is not None else []), *self._finishing]:
                        pending.call.abandon()
                        held += pending.jobs
                    admission, self._finishing = None, []
                    for job in [*jobs.values(), *held]:
                        job.resolve(exc)
                    jobs.clear()
                    batch.clear()
                    prepared, held = [], []
                if (not len(batch) and stopping and admission is None and not self._finishing and not prepared and not held
                        and self.queue.empty()):
                    self.running = 0
                    return
                self.running = (len(batch.requests) + len(prepared) + len(held) + len(self._finishing)
                                + (admission.size if admission else 0))
        finally:
            self._slicer.close()

    def _newcomer_work(self, batch: RunningBatch, admission: Admission | None, jobs: dict[int, Job]) -> list[Row] | None:
        """This step's work besides decoding: a slice of the oldest finished request's reflection passes, else a
        slice of the admission (whose last slice merges its rows' caches with the batch's; they join at once).
        Returns the rows an admission that ended left waiting (None while it goes on)."""
        slice_ = self._slice(batch)
        if self._finishing:
            finishing = self._finishing[0]
            if finishing.call.run(slice_):
                self._finishing.pop(0)
                self._resolve(finishing.jobs[0], finishing.call.result)
            return None
        if admission is None or not admission.call.run(slice_):
            return None
        return self._admitted(batch, admission, jobs)

    def _admission(
        self, batch: RunningBatch, prepared: list[Row], held: list[Job], jobs: dict[int, Job],
    ) -> tuple[Admission | None, list[Row], list[Job]]:
        """The next admission, if there is work for one: the held jobs it prepares (``_to_prepare``) and the
        prepared rows that fit now. Returns it with the rows and jobs still waiting."""
        now, later = self._to_prepare(held, len(batch) > 0)
        fitting = self._fitting(batch, prepared)
        if not now and not fitting:
            return None, prepared, later
        rest = prepared[len(fitting):]
        call = self._slicer.call(lambda: self._admit(batch, fitting, now, jobs), "admission")
        return Admission(call, now, len(now) + len(fitting)), rest, later

    def _sliced(self, batch: RunningBatch) -> bool:
        """Whether work besides decoding runs a slice per decode step now: under a step budget, while rows decode."""
        return self.step_budget is not None and len(batch) > 0

    def _slice(self, batch: RunningBatch) -> Slice:
        """What an admission may run before the next decode step: everything when no row decodes or without a
        step budget."""
        return self.step_budget.slice(self.decode_s) if self._sliced(batch) else UNBOUNDED

    def _admit(self, batch: RunningBatch, fitting: list[Row], newcomers: list[Job], jobs: dict[int, Job]) -> tuple[Joined | None, list[Row]]:
        """An admission's work (in the slicer's thread): prepare ``newcomers``, prefill, beside the
        already prepared ``fitting`` rows, the new rows that fit, and merge their caches with the batch's. Returns
        the merged batch (None if no row joins) and the rows left to wait."""
        rows = fitting + (self._prepare(batch, newcomers, jobs) if newcomers else [])
        self._slicer.checkpoint("prefill")  # the newcomers' encoding and their prefill's start: a slice each at most
        rows = self._not_cancelled(rows, jobs)
        joining = self._fitting(batch, rows)
        prefills = self._prefill(batch, joining, jobs)
        if not prefills:
            return None, rows[len(joining):]
        reserved = batch.reserve(prefills, between=lambda: self._slicer.checkpoint("reserve"))  # a layer per slice at most
        self._slicer.checkpoint("join", alone=True)  # no decode step may change the batch during the merge
        return batch.joined(prefills, reserved), rows[len(joining):]

    def _admitted(self, batch: RunningBatch, admission: Admission, jobs: dict[int, Job]) -> list[Row]:
        """Install an ended admission's merged batch (its rows take their first tokens); the rows it left waiting."""
        joined, waiting = admission.call.result()
        if joined is not None:
            batch.install(joined)
            self.batches += 1
            for row in joined.newcomers:
                if row.parent is None and row.reason is not None:  # finished with its first token
                    self._finish(batch, row, jobs)
        return waiting

    def _to_prepare(self, jobs: list[Job], decoding: bool) -> tuple[list[Job], list[Job]]:
        """``(now, later)``: while rows are decoding, at most one request whose methods run passes of their own
        (VHR's text-only prefill, GIFT's saliency, CARVE's collection) is admitted at a time, so that plain
        newcomers do not wait for several of them; plain requests are all admitted together."""
        if not decoding:
            return jobs, []
        now, later, passes = [], [], 0
        for job in jobs:
            heavy = self.engine.runs_passes(job.request)
            if heavy and passes:
                later.append(job)
            else:
                now.append(job)
                passes += heavy
        return now, later

    def _waiting(self, room: int, idle: bool) -> tuple[list[Job], bool]:
        """Jobs to admit now: when idle, wait for one and gather a burst for ``batch_wait_s``; otherwise
        take only what is already queued (decoding does not wait)."""
        taken: list[Job] = []
        deadline = time.perf_counter() + self.batch_wait_s
        while len(taken) < room:
            try:
                if idle and not taken:
                    item = self.queue.get()
                    deadline = time.perf_counter() + self.batch_wait_s  # the burst window opens with the first
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

    def _prepare(self, batch: RunningBatch, newcomers: list[Job], jobs: dict[int, Job]) -> list[Row]:
        """Admission work for ``newcomers``; a failing admission is retried job by job, so it fails alone."""
        try:
            rows = batch.prepare(
                [job.request for job in newcomers], on_token=[job.emit for job in newcomers],
                cancelled=[job.cancelled.is_set for job in newcomers],
            )
        except Exception as exc:  # isolate the failing request
            log.warning("admission of %d failed: %r", len(newcomers), exc)
            if len(newcomers) == 1:
                newcomers[0].resolve(exc)
                return []
            return [row for job in newcomers for row in self._prepare(batch, [job], jobs)]
        fits: list[Row] = []
        for job, row in zip(newcomers, rows):
            if self.max_kv_tokens is not None and row.slots > self.max_kv_tokens:
                job.resolve(RequestError("max_tokens", f"the prompt ({len(row.prompt.input_ids)} tokens) and max_tokens "
                                         f"({row.decoding.max_new_tokens}) need {row.slots} cache slots; this server holds "
                                         f"at most {self.max_kv_tokens} (max_kv_tokens)"))
                continue
            jobs[id(row)] = job
            fits.append(row)
        return fits

    def _fitting(self, batch: RunningBatch, prepared: list[Row]) -> list[Row]:
        """Prepared rows that join now, first come first served: the batch's rows (a request with a contrast
        branch takes two) and the KV budget allow them."""
        fitting, reserved, taken = [], batch.reserved, len(batch)
        for row in prepared:
            full = taken + row.width > self.max_batch_size and taken > 0  # a request alone always fits
            if full or (self.max_kv_tokens is not None and reserved + row.slots > self.max_kv_tokens):
                break
            fitting.append(row)
            reserved += row.slots
            taken += row.width
        return fitting

    def _prefill(self, batch: RunningBatch, rows: list[Row], jobs: dict[int, Job]) -> list[Prefilled]:
        """Prefill ``rows``: together on an idle server; while rows decode under a step budget, one forward per row
        (a contrast branch's and each candidate's too), so that no slice holds several rows' work. A failing
        prefill is retried row by row, so it fails alone."""
        if not rows:
            return []
        try:
            return batch.prefill(rows, apart=self._sliced(batch))
        except Exception as exc:  # isolate the failing request
            log.warning("prefill of %d failed: %r", len(rows), exc)
            if len(rows) == 1:
                jobs.pop(id(rows[0])).resolve(exc)
                return []
            return [p for row in rows for p in self._prefill(batch, [row], jobs)]

    def _not_cancelled(self, rows: list[Row], jobs: dict[int, Job]) -> list[Row]:
        """``rows`` without those whose client went; their jobs are resolved as cancelled."""
        kept = []
        for row in rows:
            if row.cancelled():
                self.cancelled += 1
                jobs.pop(id(row)).resolve(asyncio.CancelledError())
            else:
                kept.append(row)
        return kept

    def _step(self, batch: RunningBatch, jobs: dict[int, Job], disturbed: bool) -> None:
        """One decode step of the batch; ``disturbed``: newcomer work ran since the last one (``_timed``)."""
        started, rows = time.perf_counter(), len(batch)
        try:
            finished = batch.step()
        except Exception as exc:  # the rows of a failed step cannot be replayed: they fail together
            log.warning("decode step of %d rows failed: %r", len(batch), exc)
            for row in batch.requests:
                jobs.pop(id(row)).resolve(exc)
            batch.clear()
            return
        self._timed(time.perf_counter() - started, rows, disturbed)
        for row in finished:
            self._finish(batch, row, jobs)
        if self.timeline is not None:
            self.timeline("step", started, time.perf_counter())

    def _timed(self, took: float, rows: int, disturbed: bool) -> None:
        """Update ``decode_s``, the step budget's measure, with a step of ``rows`` rows that took ``took`` s, from
        the steps that followed no newcomer work, as the running rows see them alone: one that follows a slice runs
        slower on a CPU, and a budget measured on it would grow with it. A step after newcomer work counts only when
        the batch's rows changed since the last measure (no undisturbed step of this batch yet)."""
        if self.decode_s is not None and disturbed and rows == self._decode_rows:
            return
        fresh = self.decode_s is None or disturbed
        self.decode_s = took if fresh else 0.8 * self.decode_s + 0.2 * took
        self._decode_rows = rows

    def _finish(self, batch: RunningBatch, row: Row, jobs: dict[int, Job]) -> None:
        job = jobs.pop(id(row))
        if row.reason == "cancelled":
            self.cancelled += 1
            job.resolve(asyncio.CancelledError())
        elif self._sliced(batch) and _reflects(row):  # passes of its own: a slice per step
            self._finishing.append(Finishing(self._slicer.call(lambda: batch.output(row), "reflection"), [job]))
        else:
            self._resolve(job, lambda: batch.output(row))

    @staticmethod
    def _resolve(job: Job, output: Callable[[], GenerationOutput]) -> None:
        """Resolve ``job`` with ``output()``, or with what it raised."""
        try:
            out: GenerationOutput | BaseException = output()
        except Exception as exc:  # a method's reflection pass failed: this request alone fails
            log.warning("output of a finished request failed: %r", exc)
            out = exc
        job.resolve(out)


def _reflects(row: Row) -> bool:
    """Whether a finished row's methods run passes of their own once its answer is final (AGSER's)."""
    return any(HookPoint.REFLECT in getattr(state.hooks, "hook_points", ()) for state in row.states)


@dataclass
class Admission:
    """Newcomers being admitted: the call that prepares and prefills them, the jobs it prepares and how many
    rows it holds (for the batch-size count)."""

    call: SlicedCall
    jobs: list[Job]
    size: int


@dataclass
class Finishing:
    """A finished request whose output runs passes of its own (a reflection), a slice per decode step."""

    call: SlicedCall
    jobs: list[Job]

