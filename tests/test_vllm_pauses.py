"""The vLLM engine client's admission threads: their tower work in turn with the engine's steps
(``seeright.service.vllm.pauses``), against a stand-in for vLLM's engine core (a thread that runs steps and, between
two steps, the RPCs it was sent, as vLLM's busy loop does, the pause being the worker's own code), and their prompts'
sources kept whoever encodes beside them. Runs without vLLM; tests/test_vllm_engine.py runs the pauses on vLLM."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from seeright.service.slicing import StepBudget
from seeright.service.vllm import pauses as pauses_module
from seeright.service.vllm.pauses import EnginePauses
from seeright.service.vllm.worker import WorkerRuntime

STEP_S = 0.004


class EngineCore:
    """Steps of ``STEP_S`` while it has requests; RPCs between two steps; every step and pause on ``events``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, requests: int = 1) -> None:
        self.events: list[tuple[str, float, float]] = []
        self.requests = requests
        self._runtime = SimpleNamespace(steps=0, decode_s=STEP_S)
        self._loop, self._rpcs, self._stop = loop, queue.Queue(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    async def collective_rpc(self, method: str, args: tuple = ()) -> list[None]:
        assert method == "seeright_pause"
        done = self._loop.create_future()
        self._rpcs.put((args, done))
        return [await done]

    def get_num_unfinished_requests(self) -> int:
        return self.requests

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            while not self._rpcs.empty() or not self.requests:
                try:
                    args, done = self._rpcs.get(timeout=0.01)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                began = time.perf_counter()
                WorkerRuntime.pause(self._runtime, *args)
                self.events.append(("pause", began, time.perf_counter()))
                self._loop.call_soon_threadsafe(done.set_result, None)
            began = time.perf_counter()
            time.sleep(STEP_S)
            self._runtime.steps += 1
            self.events.append(("step", began, time.perf_counter()))


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()


def tower() -> SimpleNamespace:
    """An adapter with a two-block tower (each block two linear layers: the checkpoints) and no language model."""
    return SimpleNamespace(vision_blocks=[nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)) for _ in range(2)], decoder_layers=[])


def test_the_tower_work_runs_only_while_the_engine_is_held_a_step_between_two_pauses(loop):
    adapter, engine = tower(), EngineCore(loop)
    pauses = EnginePauses(engine, loop, StepBudget(segments=3), adapter)
    computed: list[float] = []
    for block in adapter.vision_blocks:
        for layer in block:
            layer.register_forward_hook(lambda *_: computed.append(time.perf_counter()))
    try:
        with pauses.sliced(), torch.no_grad():
            for _ in range(5):
                for block in adapter.vision_blocks:
                    block(torch.ones(1, 8))
                    time.sleep(0.001)
    finally:
        engine.stop()
        pauses.close()
    held = [(a, b) for kind, a, b in engine.events if kind == "pause"]
    assert all(any(a <= t <= b for a, b in held) for t in computed), "the tower computed while the engine stepped"
    working = [(a, b) for a, b in held if any(a <= t <= b for t in computed)]
    assert len(working) >= 20 // 3, "the work was not split into pauses of at most three segments"
    steps = [(a, b) for kind, a, b in engine.events if kind == "step"]
    for (_, end), (start, _) in zip(working, working[1:]):
        assert any(end <= a and b <= start for a, b in steps), "two turns of the work without a step between them"


def test_work_outside_the_tower_and_a_let_go_thread_leave_the_engine_stepping(loop):
    """Before its first checkpoint and after ``let_go`` (a thread about to wait on vLLM), the work runs beside the
    steps; with no requests, pauses need no step between them; threads not bound never pause."""
    adapter, engine = tower(), EngineCore(loop, requests=0)
    pauses = EnginePauses(engine, loop, StepBudget(segments=100), adapter)
    try:
        with torch.no_grad():
            adapter.vision_blocks[0](torch.ones(1, 8))  # not bound: no pause
            assert pauses.pauses == 0
            with pauses.sliced():
                adapter.vision_blocks[0](torch.ones(1, 8))
                assert pauses.pauses == 1
                pauses.let_go()
                adapter.vision_blocks[0](torch.ones(1, 8))  # held again, without a step between (no requests)
                assert pauses.pauses == 2
        assert [kind for kind, _, _ in engine.events] == ["pause", "pause"]
    finally:
        engine.stop()
        pauses.close()


def test_requests_that_cannot_run_yet_delay_a_pause_by_a_bounded_wait(loop, monkeypatch):
    """Requests the client counts that the engine core cannot run yet (a contrast branch held until its request
    arrives) never step: the client asks for pauses again for ``STEP_WAIT_S`` at most, then holds the engine."""
    monkeypatch.setattr(pauses_module, "STEP_WAIT_S", 0.2)
    adapter, engine = tower(), EngineCore(loop, requests=0)
    engine.get_num_unfinished_requests = lambda: 1
    pauses = EnginePauses(engine, loop, StepBudget(segments=100), adapter)
    try:
        with torch.no_grad(), pauses.sliced():
            adapter.vision_blocks[0](torch.ones(1, 8))
            pauses.let_go()
            began = time.perf_counter()
            adapter.vision_blocks[0](torch.ones(1, 8))  # held again once the wait is over
            waited = time.perf_counter() - began
        assert pauses.pauses == 2 and 0.2 <= waited < 5.0
        assert {kind for kind, _, _ in engine.events} == {"pause"}
    finally:
        engine.stop()
        pauses.close()


class Progress:
    """The runtime's progress hooks (``register_progress_hook``, ``reached``), without a model."""

    def __init__(self) -> None:
        self.hooks: list = []

    def register_progress_hook(self, hook) -> SimpleNamespace:
        self.hooks.append(hook)
        return SimpleNamespace(remove=lambda: self.hooks.remove(hook))

    def reached(self, where: str) -> None:
        for hook in list(self.hooks):
            hook(where)


def test_an_admissions_prompts_are_encoded_while_the_engine_is_held(loop):
    """The processor's preparation of a prompt's images and text is Python that holds the API process's GIL, and the
    event loop that reads vLLM's outputs waited on it (a stream's tokens, stepped every 10 ms, arrived 30-60 ms
    apart while a CARVE joiner's passes were encoded). An admission now encodes each prompt with the engine held
    between two steps (the runtime's ``"admission encode"`` checkpoint, as the transformers engine's sliced
    admission); a thread outside an admission encodes without a pause."""
    from seeright.service.vllm.passes import VllmPasses

    class Prompt:
        pass

    adapter, engine, progress = tower(), EngineCore(loop), Progress()
    pauses = EnginePauses(engine, loop, StepBudget(segments=100), adapter, progress)
    encoded: list[tuple[float, float]] = []

    def encode(turns, images) -> Prompt:
        began = time.perf_counter()
        time.sleep(0.01)
        encoded.append((began, time.perf_counter()))
        return Prompt()

    passes = VllmPasses(encode, str, None, [], None, loop, let_go=pauses.let_go, reached=progress.reached)
    try:
        passes.encode(["outside an admission"], [])
        assert pauses.pauses == 0
        with pauses.sliced():
            for i in range(3):
                passes.encode([f"prompt {i}"], [])
    finally:
        engine.stop()
        pauses.close()
    held = [(a, b) for kind, a, b in engine.events if kind == "pause"]
    assert pauses.pauses >= 1 and not any(a <= encoded[0][0] <= b for a, b in held)
    assert all(any(a <= start and end <= b for a, b in held) for start, end in encoded[1:]), "encoded beside a step"


def test_passes_remember_every_prompt_that_admissions_encode_at_once(loop):
    """Admissions encode in threads of their own: every prompt's chat and images are remembered, whoever encodes
    beside it (an update lost to a concurrent pruning fails a method's pass)."""
    import sys

    from seeright.service.vllm.passes import VllmPasses

    class Prompt:  # what the passes keep a weak reference to
        pass

    passes = VllmPasses(lambda turns, images: Prompt(), str, None, [], None, loop)
    kept: list[tuple[Prompt, list]] = []

    def encode(thread: int) -> None:
        for i in range(300):
            turns = [f"{thread}-{i}"]
            kept.append((passes.encode(turns, []), turns))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=encode, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert all(passes.source(prompt)[0] == turns for prompt, turns in kept)
