"""The engine client's own model work in turn with vLLM's steps, under the transformers engine's step budget.

The engine client runs some of a request's admission on its own copy of the vision tower, in the API process: the
methods' tower passes (PAINT's [CLS] attention, VE masking's attack) and the image embeddings of a masked tower.
Run beside the engine core's steps, that work takes their cores (a CPU) or their device, and a running stream
freezes for as long as it lasts. With :class:`EnginePauses`, an admission thread instead holds the engine core
between two of its steps while it computes: at its first checkpoint in the tower
(:class:`~seeright.service.slicing.Checkpoints`, the transformers engine's), it calls the workers' ``seeright_pause``
through ``collective_rpc``, which vLLM's engine core runs between two steps; the first worker connects back to the
client's socket with the decode forward's time (:meth:`~seeright.service.vllm.worker.WorkerRuntime.pause`) and waits
until the client closes the connection. The admission runs one budget (:meth:`StepBudget.slice` of that time, the
segments between checkpoints predicted as the transformers engine's slicer predicts them), lets the engine go and,
at its next checkpoint, holds it again, after at least one step where the engine has requests. What waits on vLLM
itself (a method's passes, which are vLLM requests) lets the engine go first. One admission holds the engine at a
time; the others wait their turn at their checkpoints. A running stream's longest gap is then one step and one budget
of that work, as on the transformers engine; the work itself is what it was, only split in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from seeright.interventions.adapters import ModelAdapter
from seeright.interventions.runtime import Runtime
from seeright.service.slicing import Checkpoints, SliceClock, StepBudget
from seeright.service.vllm.transport import EngineFailure
from seeright.service.vllm.worker import PAUSE_MESSAGE

PAUSE_LIMIT_S = 5.0  # the longest a worker waits in a pause for the client (one that went away frees it then)
CONNECT_LIMIT_S = 120.0  # the longest the client waits for a pause to begin (a long step runs before it)
STEP_WAIT_S = 1.0  # the longest the client asks for pauses again until the engine has stepped (requests it counts
# may have nothing to run yet: a contrast branch the scheduler holds until its request arrives)


class EnginePauses:
    """Pauses of ``llm``'s engine core for the work of the admission threads bound by :meth:`sliced`, checkpointed
    on ``adapter``'s tower and at ``runtime``'s admission stages (each method's rewrite and preparation, each prompt's
    encoding); ``loop`` is the event loop ``llm`` runs on."""

    def __init__(self, llm: Any, loop: asyncio.AbstractEventLoop, budget: StepBudget, adapter: ModelAdapter,
                 runtime: Runtime | None = None) -> None:
        self.budget = budget
        self.costs: dict[str, tuple[float, int | None]] = {}  # the segments' last costs, over all calls
        self.pauses = 0  # pauses held so far
        self._llm, self._loop = llm, loop
        self._lock = threading.Lock()  # held with the engine
        self._tokens = itertools.count(1)
        self._steps: int | None = None  # the engine's forwards when it was last let go
        self._folder = tempfile.mkdtemp(prefix="seeright-pauses-")
        self.address = os.path.join(self._folder, "engine.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(4)
        self._listener.settimeout(0.05)
        self._checkpoints = Checkpoints(adapter, runtime)
        self._checkpoints.hook()

    @contextlib.contextmanager
    def sliced(self) -> Iterator[None]:
        """The current thread's work on the tower in turn with the engine's steps, from its first checkpoint on."""
        call = _PausedCall(self)
        self._checkpoints.bind(call)
        try:
            yield
        finally:
            self._checkpoints.bind(None)
            call.let_go()

    def let_go(self) -> None:
        """Let the engine go where the current thread holds it (before the thread waits on vLLM)."""
        if (call := self._checkpoints.call) is not None:
            call.let_go()

    def close(self) -> None:
        self._checkpoints.unhook()
        self._listener.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def hold(self) -> Pause:
        """Pause the engine between two steps, after at least one step since the last pause where it has requests
        (for :data:`STEP_WAIT_S` at most: requests that cannot run yet never step). Returns with the engine held (and
        ``_lock``), until :meth:`release`."""
        self._lock.acquire()
        try:
            pause, began = self._pause(), time.monotonic()
            while (pause.steps == self._steps and self._llm.get_num_unfinished_requests()
                   and time.monotonic() - began < STEP_WAIT_S):
                # No step since the last pause while requests wait: one first. (The engine core drains its input
                # queue before it steps, so a pause asked for at once after the last may still come first.)
                pause.end()
                pause = self._pause()
        except BaseException:
            self._lock.release()
            raise
        self._steps = pause.steps  # (no forward runs while the engine is held)
        self.pauses += 1
        return pause

    def release(self, pause: Pause) -> None:
        """Let the engine go (and ``_lock``) once its worker has left the pause."""
        try:
            pause.end()
        finally:
            self._lock.release()

    def _pause(self) -> Pause:
        token = next(self._tokens)
        rpc = asyncio.run_coroutine_threadsafe(
            self._llm.collective_rpc("seeright_pause", args=(self.address, token, PAUSE_LIMIT_S)), self._loop)
        began = time.monotonic()
        while True:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                if rpc.done():
                    rpc.result()  # the engine's error, if any
                    raise EngineFailure("the engine left a pause without connecting to it") from None
                if time.monotonic() - began > CONNECT_LIMIT_S:
                    raise EngineFailure(f"the engine did not pause within {CONNECT_LIMIT_S:.0f} s") from None
                continue
            conn.settimeout(PAUSE_LIMIT_S)
            message = _read(conn, struct.calcsize(PAUSE_MESSAGE))
            got, steps, decode_s = struct.unpack(PAUSE_MESSAGE, message) if message else (None, 0, 0.0)
            if got == token:
                return Pause(conn, rpc, steps, decode_s or None)
            conn.close()  # a pause given up earlier: it ends now


@dataclass
class Pause:
    """The engine held between two steps: the connection its worker waits on, the pause's RPC, the forwards the
    engine had run, and its decode forward's seconds (None before the first)."""

    conn: socket.socket
    rpc: Future
    steps: int
    decode_s: float | None

    def end(self) -> None:
        """Let the engine go; returns once its worker has left the pause."""
        self.conn.close()
        self.rpc.result(timeout=CONNECT_LIMIT_S)


class _PausedCall:
    """One admission thread's turns with the engine (``checkpoint`` as :class:`~seeright.service.slicing.SlicedCall`'s)."""

    def __init__(self, pauses: EnginePauses) -> None:
        self._pauses = pauses
        self._clock = SliceClock(pauses.costs)
        self._held: Pause | None = None

    def checkpoint(self, key: str, alone: bool = False, size: int | None = None) -> None:
        if self._held is not None:
            if not self._clock.reached(key, alone, size):
                return
            self.let_go()
        self._held = self._pauses.hold()
        self._clock.start(self._pauses.budget.slice(self._held.decode_s))

    def let_go(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._pauses.release(held)


def _read(conn: socket.socket, size: int) -> bytes | None:
    """``size`` bytes from ``conn``, or None where it closed or timed out first."""
    data = b""
    with contextlib.suppress(OSError):
        while len(data) < size and (chunk := conn.recv(size - len(data))):
            data += chunk
    return data if len(data) == size else None
