"""Continuous batching (``seeright.service.batching.RunningBatch``): rows that join and leave mid-generation get the
tokens and log-probs they get alone, for every method and mixes, on both families; a row that leaves frees
its cache rows; a short request does not wait for a long one."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import FAMILIES, QUESTIONS, make_image
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batch_mates import SETTINGS, alone, batches, engine_for, request

from seeright.service.batching import RunningBatch
from seeright.service.client import EngineClient
from seeright.service.engine import Engine, GenerationOutput, GenerationRequest, RequestError
from seeright.service.scheduler import Scheduler
from seeright.service.slicing import UNBOUNDED, Slice, SlicedCall, Slicer, StepBudget

PLANS = [{}, {"var": {}}, {"gift": {}}, {"vhr": {}}, {"carve": {}}, {"gift": {}, "vhr": {}}, {"var": {"rho": 0.8}, "gift": {}},
         {"vcd": {}}, {"pai": {"cfg": True}}, {"ritual": {"seed": 4}}, {"vcd": {"seed": 1}, "pai": {}}]


def staggered(
    engine: Engine, requests: list[GenerationRequest], joins: list[int], segments: int | None = None
) -> list[GenerationOutput]:
    """Row i's admission starts before decode step ``joins[i]`` of the running batch (0: with the first). With
    ``segments``, an admission that starts while rows decode runs that many segments (between the model's
    blocks) per decode step, in its own thread, as the scheduler's step budget runs it."""
    batch, outputs, index = RunningBatch(engine), {}, {}
    slicer = Slicer(engine.adapter, engine.runtime)
    waiting = sorted(range(len(requests)), key=lambda i: joins[i])
    admitting: tuple[list[int], SlicedCall] | None = None
    step = 0
    try:
        while waiting or len(batch) or admitting:
            now = [i for i in waiting if joins[i] <= step]
            if admitting is None and (now or not len(batch)):
                now = now or [waiting[0]]
                waiting = [i for i in waiting if i not in now]
                apart = bool(segments and len(batch))  # sliced: a forward per row, as the scheduler prefills then
                admitting = now, slicer.call(lambda now=now, apart=apart: batch.joined(batch.prefill(batch.prepare([requests[i] for i in now]), apart)))
            if admitting is not None and admitting[1].run(Slice(segments=segments) if segments and len(batch) else UNBOUNDED):
                joined = admitting[1].result()
                batch.install(joined)
                for i, row in zip(admitting[0], [r for r in joined.newcomers if r.parent is None]):
                    index[id(row)] = i
                    if row.reason is not None:
                        outputs[i] = batch.output(row)
                admitting = None
            if len(batch):
                for row in batch.step():
                    outputs[index[id(row)]] = batch.output(row)
            step += 1
    finally:
        slicer.close()
    return [outputs[i] for i in range(len(requests))]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("segments", [None, 3])
def test_rows_joining_and_leaving_equal_each_alone(family, segments):
    """With ``segments`` 3, the admissions that start while rows decode (method passes and prefill) run three
    segments between the model's blocks per decode step."""
    engine = engine_for(family)
    reqs = [GenerationRequest(prompt=QUESTIONS[i % 4], images=[make_image(i, (40 + 8 * i, 40))], interventions=plan,
                              max_new_tokens=3 + (5 * i) % 7, logprobs=True) for i, plan in enumerate(PLANS)]
    outs = staggered(engine, reqs, joins=[1, 0, 1, 3, 4, 6, 7, 0, 2, 5, 8], segments=segments)
    for req, out in zip(reqs, outs):
        ref = engine.generate_batch([req])[0]
        assert out.token_ids == ref.token_ids, req.interventions
        assert max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs)) < 1e-4, req.interventions
        assert out.finish_reason == ref.finish_reason


@settings(max_examples=40, **SETTINGS)
@given(batches(), st.lists(st.integers(0, 4), min_size=6, max_size=6), st.sampled_from([None, 1, 2, 5, 11]))
def test_random_rows_joining_at_random_steps_equal_each_alone(batch, joins, segments):
    family, drawn = batch
    engine = engine_for(family)
    outs = staggered(engine, [request(r) for r in drawn], joins[: len(drawn)], segments)
    for row, out in zip(drawn, outs):
        ref = alone(family, engine, row)
        assert out.token_ids == ref.token_ids, (row, joins, segments)
        assert max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs)) < 1e-4, (row, joins, segments)


def test_leaving_rows_free_their_cache():
    engine = engine_for(FAMILIES[0])
    batch = RunningBatch(engine)
    stop = {"now": False}
    long_req = GenerationRequest(prompt=QUESTIONS[0], images=[make_image(0)], max_new_tokens=30)
    short_req = GenerationRequest(prompt=QUESTIONS[2] + " Please answer in great detail now.", images=[make_image(1)],
                                  max_new_tokens=30)
    batch.admit([long_req])
    alone_slots = batch.cached_tokens
    batch.admit([short_req], cancelled=[lambda: stop["now"]])
    assert len(batch) == 2 and batch.cached_tokens > 2 * alone_slots - 2
    stop["now"] = True
    finished = batch.step()
    assert [row.reason for row in finished] == ["cancelled"] and len(batch) == 1
    assert batch.cached_tokens == alone_slots + 1  # one row, its own length: the cancelled row's slots are gone
    while len(batch):
        batch.step()
    assert batch.cache is None and batch.cached_tokens == 0


def test_a_sliced_call_whose_checkpoints_fail_to_install_fails_alone_and_the_slicer_goes_on(monkeypatch):
    engine = engine_for(FAMILIES[0])
    slicer = Slicer(engine.adapter, engine.runtime)
    try:
        install = slicer.checkpoints.install
        monkeypatch.setattr(slicer.checkpoints, "install", lambda call: (_ for _ in ()).throw(RuntimeError("no hooks")))
        failing = slicer.call(lambda: "never")
        assert failing.run() and engine.runtime.progress_hooks == {}
        with pytest.raises(RuntimeError, match="no hooks"):
            failing.result()
        monkeypatch.setattr(slicer.checkpoints, "install", install)
        paused = slicer.call(lambda: engine.generate_batch([GenerationRequest(prompt=QUESTIONS[0], max_new_tokens=2)])[0])
        assert not paused.run(Slice(segments=1)) and len(engine.runtime.progress_hooks) == 1  # paused, hooked
        while not paused.run(Slice(segments=3)):
            pass
        assert paused.slices > 2 and paused.result().token_ids and engine.runtime.progress_hooks == {}
    finally:
        slicer.close()


def test_a_segment_is_predicted_from_its_last_cost_at_the_same_checkpoint_scaled_by_its_input():
    """The first layer of a prompt's prefill after a decode step's: the same module, a thousand times the input."""
    engine = engine_for(FAMILIES[0])
    slicer = Slicer(engine.adapter, engine.runtime)
    after: list[bool] = []

    def work() -> None:
        slicer.checkpoints.reached("k", size=1)
        time.sleep(0.002)
        slicer.checkpoints.reached("k", size=1000)  # predicted 1000 x 2 ms: over the slice, so it pauses here
        after.append(True)

    try:
        call = slicer.call(work)
        assert not call.run(Slice(seconds=0.5)) and not after
        assert call.run(Slice(seconds=0.5)) and after
    finally:
        slicer.close()


def test_only_the_first_prefill_of_an_admission_takes_the_batchs_spare_rows():
    """The first prefill's cache may become the batch's; the others are merged and dropped: a pass batch of n rows
    (n - 1 spare rows) must not allocate n x n rows at once (a fork of the process once failed on that)."""
    engine = engine_for(FAMILIES[0])
    batch = RunningBatch(engine, spare_rows=5)
    rows = batch.prepare([GenerationRequest(prompt=QUESTIONS[0], max_new_tokens=2) for _ in range(3)])
    prefills = batch.prefill(rows, apart=True)
    assert [p.cache.layers[0].buffers[0].shape[0] for p in prefills] == [1 + 5, 1 + 2, 1 + 2]
    batch.install(batch.joined(prefills))
    assert len(batch) == 3 and batch.cache.layers[0].buffers[0] is prefills[0].cache.layers[0].buffers[0]  # joined in place


def test_a_calls_first_segment_is_predicted_from_the_last_call_of_its_kind():
    """A call starts at checkpoint "{kind} start": work before its first checkpoint that overran a slice last time
    waits for a slice of its own."""
    engine = engine_for(FAMILIES[0])
    slicer = Slicer(engine.adapter, engine.runtime)
    started: list[int] = []

    def work() -> None:
        started.append(1)
        time.sleep(0.05)

    try:
        assert slicer.call(work, "x").run(Slice(seconds=0.01)) and started == [1]  # nothing known: it runs whole
        call = slicer.call(work, "x")
        assert not call.run(Slice(seconds=0.01)) and started == [1]  # predicted 50 ms: it pauses before starting
        assert call.run(Slice(seconds=0.01)) and started == [1, 1]  # then runs in the next slice, alone
        assert slicer.call(work, "y").run(Slice(seconds=0.01)) and started == [1, 1, 1]  # another kind: unknown
    finally:
        slicer.close()


def test_the_step_budget_is_measured_on_decode_steps_that_followed_no_newcomer_work():
    """A step slowed by the slice before it does not grow the next slice; a batch whose rows changed is measured
    on its first step whatever came before it."""
    scheduler = Scheduler(engine_for(FAMILIES[0]), step_budget=StepBudget(ratio=1.0, floor_s=0.0))
    for disturbed, took, rows, want in [(False, 0.010, 1, 0.010), (True, 0.050, 1, 0.010), (False, 0.020, 1, 0.012),
                                        (True, 0.030, 3, 0.030), (True, 0.090, 3, 0.030), (False, 0.020, 3, 0.028)]:
        scheduler._timed(took, rows, disturbed)
        assert scheduler.decode_s == pytest.approx(want)
        assert scheduler.step_budget.slice(scheduler.decode_s).seconds == pytest.approx(want)


@pytest.mark.parametrize("plan", [{}, {"carve": {}}, {"vemask": {}}], ids=["plain", "carve", "vemask"])
def test_a_running_stream_keeps_decoding_while_a_newcomer_is_admitted(plan):
    """Through the scheduler with a step budget of two segments: the running request gets tokens between the
    newcomer's arrival and its first token (its admission, method passes included, runs between decode steps),
    and the newcomer's answer is its answer alone."""
    engine = engine_for(FAMILIES[0])
    scheduler = Scheduler(engine, max_batch_size=4, batch_wait_s=0.0, step_budget=StepBudget(segments=2))
    client = EngineClient(scheduler)
    stream: list[float] = []
    newcomer = GenerationRequest(prompt=QUESTIONS[1], images=[make_image(1)], max_new_tokens=5, logprobs=True,
                                 interventions=plan)
    scheduler.start()

    async def main() -> tuple[GenerationOutput, float, float]:
        long_req = GenerationRequest(prompt=QUESTIONS[2], images=[make_image(0)], max_new_tokens=400)
        long_task = asyncio.ensure_future(_stream(client, long_req, stream))
        while len(stream) < 3:
            await asyncio.sleep(0.01)
        sent, first, joining = time.perf_counter(), [], client.stream(newcomer)
        async for _ in joining:
            first = first or [time.perf_counter()]
        long_task.cancel()
        return joining.output, sent, first[0]

    try:
        out, sent, first = asyncio.run(main())
    finally:
        scheduler.stop()
    assert sum(sent < t < first for t in stream) >= 3
    alone = engine.generate_batch([newcomer])[0]
    assert out.token_ids == alone.token_ids and max(abs(a - b) for a, b in zip(out.logprobs, alone.logprobs)) < 1e-4


async def _stream(client: EngineClient, request: GenerationRequest, times: list[float]) -> None:
    async for _ in client.stream(request):
        times.append(time.perf_counter())


def test_a_leaving_request_takes_its_contrast_branch_along():
    engine = engine_for(FAMILIES[1])
    batch = RunningBatch(engine)
    stop = {"now": False}
    batch.admit([GenerationRequest(prompt=QUESTIONS[0], images=[make_image(0)], max_new_tokens=30)])
    alone_slots = batch.cached_tokens
    [row] = batch.admit([GenerationRequest(prompt=QUESTIONS[1], images=[make_image(1)], max_new_tokens=30,
                                           interventions={"vcd": {}})], cancelled=[lambda: stop["now"]])
    assert len(batch) == 3 and len(batch.requests) == 2 and row.branch in batch.rows and row.width == 2
    assert row.slots == 2 * (len(row.prompt.input_ids) + 30)  # the KV budget counts the branch
    stop["now"] = True
    assert batch.step() == [row] and len(batch) == 1 and batch.cached_tokens == alone_slots + 1


def test_a_short_request_does_not_wait_for_a_long_one():
    """Through the scheduler: a 2-token request sent while a 400-token request decodes finishes first."""
    engine = engine_for(FAMILIES[0])
    scheduler = Scheduler(engine, max_batch_size=4, batch_wait_s=0.0)
    client = EngineClient(scheduler)
    scheduler.start()

    async def main() -> tuple[float, bool]:
        long_req = GenerationRequest(prompt=QUESTIONS[2], images=[make_image(0)], max_new_tokens=400)
        short_req = GenerationRequest(prompt=QUESTIONS[0], images=[make_image(1)], max_new_tokens=2)
        long_task = asyncio.ensure_future(client.generate(long_req))
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        await client.generate(short_req)
        return time.perf_counter() - started, long_task.done()

    try:
        _, long_done = asyncio.run(main())
    finally:
        scheduler.stop()
    assert not long_done  # the short one finished while the long one was still decoding


def test_admissions_with_passes_take_turns_between_decode_steps(monkeypatch):
    """While a row decodes, requests whose methods run passes of their own (VHR, CARVE) are prepared one per
    decode step, so the running row waits for one such admission at a time; their answers stay their own."""
    engine = engine_for(FAMILIES[0])
    events: list[str] = []
    admit, step = Engine.admit, RunningBatch.step
    monkeypatch.setattr(Engine, "admit", lambda self, reqs: events.append(f"admit {len(reqs)}") or admit(self, reqs))
    monkeypatch.setattr(RunningBatch, "step", lambda self: events.append("step") or step(self))
    scheduler = Scheduler(engine, max_batch_size=8, batch_wait_s=0.0)
    client = EngineClient(scheduler)
    heavy = [GenerationRequest(prompt=QUESTIONS[i], images=[make_image(i)], max_new_tokens=3, interventions=plan)
             for i, plan in enumerate([{"vhr": {}}, {"carve": {}}, {"vhr": {}, "var": {}}])]
    scheduler.start()

    async def main() -> list[GenerationOutput]:
        long_task = asyncio.ensure_future(client.generate(
            GenerationRequest(prompt=QUESTIONS[2], images=[make_image(3)], max_new_tokens=200)))
        while "step" not in events:
            await asyncio.sleep(0.01)
        outs = await asyncio.gather(*(client.generate(r) for r in heavy))
        long_task.cancel()
        return outs

    try:
        outs = asyncio.run(main())
    finally:
        scheduler.stop()
    admissions = [i for i, e in enumerate(events) if e.startswith("admit")]
    assert [events[i] for i in admissions[1:4]] == ["admit 1"] * 3
    assert all("step" in events[a:b] for a, b in zip(admissions[1:], admissions[2:4]))  # a decode step between each
    monkeypatch.undo()
    assert [o.token_ids for o in outs] == [engine.generate_batch([r])[0].token_ids for r in heavy]


def test_the_burst_window_opens_with_the_first_request_after_idling():
    """A worker idle for longer than ``batch_wait_s`` still gathers a request that follows the first within it."""
    engine = engine_for(FAMILIES[0])
    scheduler = Scheduler(engine, max_batch_size=8, batch_wait_s=0.3)
    client = EngineClient(scheduler)
    reqs = [GenerationRequest(prompt=QUESTIONS[i], images=[make_image(i)], max_new_tokens=2) for i in range(2)]
    scheduler.start()

    async def main() -> None:
        await asyncio.sleep(0.6)  # idle past the window
        first = asyncio.ensure_future(client.generate(reqs[0]))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, client.generate(reqs[1]))

    try:
        asyncio.run(main())
    finally:
        scheduler.stop()
    assert scheduler.batches == 1


def test_kv_budget_makes_rows_wait_and_refuses_what_never_fits():
    engine = engine_for(FAMILIES[0])
    reqs = [GenerationRequest(prompt=QUESTIONS[i], images=[make_image(i)], max_new_tokens=6) for i in range(2)]
    slots = max(len(engine.encode(r.chat(), r.images).input_ids) for r in reqs) + 6
    scheduler = Scheduler(engine, max_batch_size=8, batch_wait_s=0.05, max_kv_tokens=slots + 3)
    client = EngineClient(scheduler)
    scheduler.start()

    async def main():
        together = await asyncio.gather(*(client.generate(r) for r in reqs))
        too_big = GenerationRequest(prompt=QUESTIONS[0], images=[make_image(0)], max_new_tokens=slots + 10)
        with pytest.raises(RequestError, match="max_tokens"):
            await client.generate(too_big)
        return together

    try:
        outs = asyncio.run(main())
    finally:
        scheduler.stop()
    assert scheduler.batches == 2  # one budget's worth at a time: the second joined after the first left
    assert [o.token_ids for o in outs] == [engine.generate_batch([r])[0].token_ids for r in reqs]


def test_identical_requests_and_a_failing_loop_keep_the_worker_serving(monkeypatch):
    engine = engine_for(FAMILIES[0])
    scheduler = Scheduler(engine, max_batch_size=8, batch_wait_s=0.05)
    client = EngineClient(scheduler)
    req = GenerationRequest(prompt=QUESTIONS[0], images=[make_image(0)], max_new_tokens=3)
    scheduler.start()
    try:
        async def twice():
            return await asyncio.wait_for(asyncio.gather(client.generate(req), client.generate(req)), 60)

        twins = asyncio.run(twice())
        assert twins[0].token_ids == twins[1].token_ids == engine.generate_batch([req])[0].token_ids

        def broken(*args):
            monkeypatch.undo()
            raise RuntimeError("scheduler bug (injected)")

        monkeypatch.setattr(scheduler, "_fitting", broken)
        with pytest.raises(RuntimeError, match="injected"):
            asyncio.run(asyncio.wait_for(client.generate(req), 60))
        assert asyncio.run(asyncio.wait_for(client.generate(req), 60)).token_ids == twins[0].token_ids  # still serving
    finally:
        scheduler.stop()
