"""Admission work that yields to decode steps: the scheduler's per-step work budget.

A newcomer's admission (checks, image encoding, its methods' passes: VHR's text-only prefill, GIFT's saliency,
CARVE's collection generations, VE masking's attack; then its prefill), and a finished request's reflection passes
(AGSER's), run in a thread of their own as a :class:`SlicedCall` (run by a :class:`Slicer`'s one thread), strictly
alternating with the scheduler's thread: the scheduler hands it a :class:`Slice`, waits until it pauses or ends,
then runs one decode step of the running rows. The call pauses at :class:`Checkpoints`, forward pre-hooks on every
linear layer and every attention module in the blocks of the language model and the vision tower, and points in
the language model's attention function (a few milliseconds of work apart for a 7B model's prompt on a GPU, up to
tens on a CPU), which act only in a sliced call's own thread. The admission computes exactly what it computes whole
(the same forwards, only split in time), whatever the method, so a running row waits at most one slice of newcomer
work between two of its tokens (like vLLM's ``max_num_batched_tokens`` with chunked prefill, but with the split at
block boundaries, which every method allows: VHR's heads and VAR's sinks are chosen over the whole prompt exactly
as before).

Two threads share the model safely because they never run at once and because what an admission installs
for its own forward (the runtime's context, its hooks, VE masking's tower masks, its LoRA rows) belongs to its
thread (:mod:`seeright.interventions.thread_hooks`); grad and inference modes are per thread in torch.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from seeright.interventions.adapters import ModelAdapter
from seeright.interventions.runtime import Runtime

T = TypeVar("T")



@dataclass(frozen=True)
class Slice:
    """How long a sliced call may run before it pauses: until ``seconds`` would be exceeded (the segment that
    starts at a checkpoint is predicted to cost what it cost when it last started at the same place of a block, in
    this call or an earlier one, e.g. the attention of the layer before, scaled by the size of the module's input:
    the first layer of a prompt's prefill after a decode step's), or for ``segments`` segments. A call always runs
    at least one segment per slice, so it advances."""

    seconds: float = math.inf
    segments: int | None = None


UNBOUNDED = Slice()


@dataclass(frozen=True)
class StepBudget:
    """Newcomer work the scheduler runs per decode step of the running rows: ``ratio`` times the decode step's
    own time (a moving average), at least ``floor_s``; or, where ``segments`` is set, that many segments between
    checkpoints (machine-independent: the tests draw it). A running row's longest gap between tokens is then
    about ``1 + ratio`` decode steps, and a newcomer's admission while rows decode takes about ``1 + 1 / ratio``
    times its time alone. The default, 1: smaller budgets did not shorten the longest gaps and cost the newcomers
    their time (``seeright bench --serving --step-budget 0 0.5 0.75 1``, rendered in docs/engines.md)."""

    ratio: float = 1.0
    floor_s: float = 0.005
    segments: int | None = None

    def slice(self, decode_s: float | None) -> Slice:
        if self.segments is not None:
            return Slice(segments=self.segments)
        if decode_s is None:
            return Slice(seconds=self.floor_s)
        return Slice(seconds=max(self.ratio * decode_s, self.floor_s))


DEFAULT_STEP_BUDGET = StepBudget()


class Abandoned(Exception):
    """Raised inside a sliced call that its owner gave up (after a failed scheduler step)."""


class Checkpoints:
    """Pre-hooks on every linear layer and attention module inside the blocks of the vision tower and the language
    model, and (given the runtime, as its progress hooks) in the language model's attention function (at its start,
    between the key/value projections and the attention itself, and between the stages of an attention recomputed
    with edits: scores, probabilities, weighted values) and before each of an admission's stages (each method's
    rewrite, each prompt's encoding, ...), where the sliced call bound to the current thread may pause; in any other thread
    they do nothing. The transformers engine's slicer installs them only while a call runs (``install`` / ``remove``
    from the slicer's thread, outside any forward), so traffic with nothing joining pays nothing for them; the vLLM
    engine client keeps them on its copy of the tower (``hook``), each admission thread bound to its own call
    (``bind``: :mod:`seeright.service.vllm.pauses`)."""

    def __init__(self, adapter: ModelAdapter, runtime: Runtime | None = None) -> None:
        self._local = threading.local()
        self._runtime = runtime
        towers = [("vision", block) for block in adapter.vision_blocks] + [("text", block) for block in adapter.decoder_layers]
        self._points = [
            (module, f"{tower} {name}") for tower, block in towers for name, module in block.named_modules()
            if isinstance(module, nn.Linear) or name in ("self_attn", "attn")
        ]
        self._handles: list[RemovableHandle] = []

    def install(self, call: Any) -> None:
        """Bind ``call`` to the current thread and install the hooks."""
        self.bind(call)
        self.hook()

    def remove(self) -> None:
        """Remove the hooks and unbind the current thread's call."""
        self.unhook()
        self.bind(None)

    def bind(self, call: Any) -> None:
        """Make ``call`` (a :class:`SlicedCall`, or anything with its ``checkpoint``; None: nothing) the current
        thread's: the hooks pause it in this thread only."""
        self._local.call = call

    @property
    def call(self) -> Any:
        """The current thread's bound call, or None."""
        return getattr(self._local, "call", None)

    def hook(self) -> None:
        """Install the hooks (once)."""
        if not self._handles:
            self._handles = [module.register_forward_pre_hook(partial(self._reached, key)) for module, key in self._points]
            if self._runtime is not None:
                self._handles.append(self._runtime.register_progress_hook(self.reached))

    def unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reached(self, key: str, alone: bool = False, size: int | None = None) -> None:
        """Checkpoint ``key``: the current thread's sliced call (if any) may pause here (see
        :meth:`SlicedCall.checkpoint`)."""
        if (call := self.call) is not None:
            call.checkpoint(key, alone, size)

    def _reached(self, key: str, module: nn.Module, args: Any) -> None:
        self.reached(key, size=args[0].numel() if args and isinstance(args[0], torch.Tensor) else None)


class Slicer:
    """The checkpoints on a model and the one thread that runs its sliced calls, one call at a time; ``close`` ends
    the thread."""

    def __init__(self, adapter: ModelAdapter, runtime: Runtime | None = None, name: str = "seeright-admission") -> None:
        self.checkpoints = Checkpoints(adapter, runtime)
        # the last cost of the segment from each checkpoint and the size of its input, over all calls: an
        # admission's first segment of a kind is predicted from the previous admission's
        self.costs: dict[str, tuple[float, int | None]] = {}
        self._pending: queue.SimpleQueue[SlicedCall | None] = queue.SimpleQueue()
        self._current: SlicedCall | None = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T], kind: str = "call") -> SlicedCall[T]:
        """``fn`` as a call this slicer's thread runs a slice at a time (it starts at the call's first ``run``). It
        starts at checkpoint ``"{kind} start"``, so that its first segment is predicted from the previous call of
        that ``kind`` (an admission, a reflection)."""
        return SlicedCall(fn, self, kind)

    def checkpoint(self, key: str, alone: bool = False) -> None:
        """A checkpoint outside the model's blocks; with ``alone``, what follows starts a slice of its own (unless
        the slice has just begun), so that it lands between two decode steps with nothing else (an admission's
        merge with the batch's cache, which the first decode step of the grown batch follows). Nothing outside
        this slicer's thread."""
        self.checkpoints.reached(key, alone)

    def close(self) -> None:
        """Abandon a call left paused and end the thread."""
        if self._current is not None:
            self._current.abandon()
        self._pending.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (call := self._pending.get()) is not None:
            self._current = call
            call._execute(before=partial(self.checkpoints.install, call), before_end=self.checkpoints.remove)


class SlicedCall(Generic[T]):
    """``fn()`` run by a :class:`Slicer`'s thread, a slice at a time; the caller's thread waits while it runs."""

    def __init__(self, fn: Callable[[], T], slicer: Slicer, kind: str = "call") -> None:
        self._fn = fn
        self._kind = kind
        self._slicer = slicer
        self._go, self._paused = threading.Semaphore(0), threading.Semaphore(0)
        self._started = False
        self._clock = SliceClock(slicer.costs)
        self._abandoned = False
        self._value: T | None = None
        self._error: BaseException | None = None
        self.done = False
        self.slices = 0  # slices run so far

    def run(self, slice_: Slice = UNBOUNDED) -> bool:
        """Let the call run for ``slice_``; returns once it paused or ended: whether it ended."""
        if self.done:
            return True
        self.slices += 1
        self._clock.start(slice_)
        if not self._started:
            self._started = True
            self._slicer._pending.put(self)
        else:
            self._go.release()
        self._paused.acquire()
        return self.done

    def result(self) -> T:
        """What ``fn`` returned (or raise what it raised); only once ``done``."""
        if not self.done:
            raise RuntimeError("the sliced call has not ended")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def abandon(self) -> None:
        """Stop a call that has not ended: it raises :class:`Abandoned` at its next checkpoint. Returns once it
        has, so no model code of it runs afterwards."""
        if self.done:
            return
        if not self._started:
            self.done, self._error = True, Abandoned()
            return
        self._abandoned = True
        self.run()

    def checkpoint(self, key: str, alone: bool = False, size: int | None = None) -> None:
        """Called in the slicer's thread at checkpoint ``key``: pause here if the slice is spent
        (:meth:`SliceClock.reached`)."""
        if not self._clock.reached(key, alone, size):
            return
        self._paused.release()
        self._go.acquire()
        if self._abandoned:
            raise Abandoned

    def _execute(self, before: Callable[[], None], before_end: Callable[[], None]) -> None:
        """Run ``before`` and ``fn`` (in the slicer's thread), then ``before_end`` while the owner still waits; what
        either raises is the call's error."""
        try:
            before()
            self.checkpoint(f"{self._kind} start")
            self._value = self._fn()
            self._clock.ended()
        except BaseException as exc:  # noqa: BLE001 - handed to the owner by result()
            self._error = exc
        finally:
            before_end()
            self.done = True
            self._paused.release()


class SliceClock:
    """The time a slice has run, segment by segment between checkpoints, and whether the segment that starts at a
    checkpoint still fits; each segment's cost is kept in ``costs`` (shared by the calls of one model) by the
    checkpoint it started at."""

    def __init__(self, costs: dict[str, tuple[float, int | None]]) -> None:
        self.costs = costs
        self.slice = UNBOUNDED
        self.began = self.last = 0.0
        self.segments = 0
        self.at: str | None = None  # the checkpoint the running segment started at
        self.size: int | None = None  # the size of the input of the module the running segment starts with

    def start(self, slice_: Slice) -> None:
        """A slice begins now (after a pause: what runs next up to a checkpoint is new code, no cost known)."""
        self.slice, self.segments, self.at = slice_, 0, None
        self.began = self.last = time.perf_counter()

    def ended(self) -> float:
        """End the running segment: its time, recorded as the cost of the segment from its checkpoint."""
        now = time.perf_counter()
        segment, self.last = now - self.last, now
        if self.at is not None:
            self.costs[self.at] = segment, self.size
        return segment

    def reached(self, key: str, alone: bool = False, size: int | None = None) -> bool:
        """At checkpoint ``key`` (which module of a block, with ``size`` the number of elements of its input where
        known): whether to pause here, the slice being spent, or about to be by the segment that starts here (as
        :func:`_predicted`); with ``alone``, also if anything ran in this slice."""
        segment = self.ended()
        self.at, self.size = key, size
        self.segments += 1
        s = self.slice
        coming = _predicted(self.costs.get(key), size, segment)
        spent = (s.segments is not None and self.segments >= s.segments) or (self.last - self.began) + coming > s.seconds
        return spent or (alone and self.segments > 1)


def _predicted(last: tuple[float, int | None] | None, size: int | None, fallback: float) -> float:
    """The predicted cost of a segment: its last cost at the same checkpoint, scaled by the input's size when both
    are known; ``fallback`` (the segment just run) for a checkpoint not met before."""
    if last is None:
        return fallback
    cost, was = last
    return cost * size / was if size and was else cost
