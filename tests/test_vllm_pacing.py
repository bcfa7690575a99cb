"""vLLM's step budget in time (``service/vllm/pacing.py``, no vLLM needed): the decode step's time and a prompt
token's measured from the steps the scheduler hands out, and the prompt tokens a step may take beside decoding rows.
The scheduler's use of it is tested with vLLM's scheduler in ``tests/test_vllm_engine.py``; its effect on a running
stream is ``seeright bench --serving --engine vllm``'s."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from seeright.service.vllm.pacing import GROWTH, MIN_CHUNK, WINDOW, PrefillPace


def _request(prompt: int, computed: int, recomputed: int | None = None) -> SimpleNamespace:
    """A vLLM request as its scheduler leaves it after a step: ``computed`` counts that step's tokens; a method's
    rows from ``recomputed`` on have their attention computed again."""
    return SimpleNamespace(num_prompt_tokens=prompt, num_computed_tokens=computed, recomputed=recomputed)


def _recomputed(request: SimpleNamespace) -> int | None:
    return request.recomputed


def _step(pace: PrefillPace, requests: dict, scheduled: dict[str, int], at: float, took: float) -> None:
    output = SimpleNamespace(num_scheduled_tokens=scheduled)
    pace.scheduled(output, requests, now=at)
    pace.finished(output, now=at + took)


def test_a_steps_prompt_tokens_are_what_step_budget_decode_steps_hold():
    pace = PrefillPace(step_budget=1.0)
    assert pace.budget(decode_tokens=2, cap=512) == 512  # nothing measured: the cap
    decoding = {"a": _request(10, 21), "b": _request(10, 31)}
    _step(pace, decoding, {"a": 1, "b": 1}, at=0.0, took=0.010)
    assert pace.decode_s == pytest.approx(0.010) and pace.token_s is None
    assert pace.budget(2, 512) == 512  # no prompt token measured yet
    joined = {**decoding, "new": _request(600, 100)}  # a chunk of 100 prompt tokens beside the two rows
    _step(pace, joined, {"a": 1, "b": 1, "new": 100}, at=0.1, took=0.030)
    assert pace.token_s == pytest.approx(0.020 / 100)
    assert pace.budget(2, 512, now=0.13) == 2 + 50  # right after the last step: a decode step's worth, 10 ms / 0.2 ms
    assert pace.budget(2, 40, now=0.13) == 40  # within the cap
    assert pace.budget(2, 512, now=0.1339) == 2 + 30  # 3.9 ms since the last step (a pause the rows waited through)
    assert pace.budget(2, 512, now=0.2) == 2 + MIN_CHUNK  # a budget and more since: the fewest
    assert pace.budget(0, 512, now=0.13) == 512  # nothing decodes: nothing to keep going
    twice = PrefillPace(step_budget=2.0)
    twice.decode_s, twice.token_s = pace.decode_s, pace.token_s
    assert twice.budget(2, 512) == 2 + 100  # (no step has ended here yet: nothing spent since)


def test_a_prompt_always_progresses():
    pace = PrefillPace(step_budget=1.0)
    pace.decode_s, pace.token_s = 0.001, 0.01  # a prompt token costs ten decode steps
    assert pace.budget(4, 512) == 4 + MIN_CHUNK


def test_the_averages_follow_the_steps_and_skip_what_they_cannot_split():
    pace = PrefillPace(step_budget=1.0)
    # a chunk beside decoding rows before any decode step is measured: the rows' share is unknown, nothing learnt
    _step(pace, {"a": _request(10, 21), "new": _request(600, 64)}, {"a": 1, "new": 64}, at=0.0, took=0.05)
    assert pace.token_s is None and pace.decode_s is None
    # a prompt alone: all of the step is its tokens'
    _step(pace, {"new": _request(600, 128)}, {"new": 64}, at=1.0, took=0.032)
    assert pace.token_s == pytest.approx(0.032 / 64)
    for at in (2.0, 2.1, 2.2):
        _step(pace, {"a": _request(10, 30)}, {"a": 1}, at=at, took=0.010)
    for at in (3.0, 3.1, 3.2):
        _step(pace, {"a": _request(10, 40)}, {"a": 1}, at=at, took=0.020)
    assert pace.decode_s == pytest.approx(0.015)  # the median of the last steps, moving to the slower ones
    # a preempted request recomputing its prompt and outputs from 0 is prompt work, not decoding
    _step(pace, {"back": _request(10, 15)}, {"back": 15}, at=4.0, took=0.003)
    assert pace.token_s == pytest.approx((0.032 / 64 + 0.003 / 15) / 2)


def test_a_stalled_step_does_not_move_the_budget_and_a_lasting_change_does():
    """A step the machine or the engine core stalled (the first request of a method importing its module, another
    process taking a core) would, in a moving average, raise the decode step's time and so the prompt tokens of the
    next steps, which then freeze the streams longer: the estimates are medians of the last steps."""
    pace = PrefillPace(step_budget=1.0)
    rows, joined = {"a": _request(10, 21)}, {"a": _request(10, 21), "new": _request(600, 100)}
    steps = [(rows, {"a": 1}, took) for took in (0.010, 0.010, 0.010, 0.120, 0.010)]
    # 100 prompt tokens beside the row: 0.2 ms each, and a stalled chunk
    steps += [(joined, {"a": 1, "new": 100}, took) for took in (0.030, 0.030, 0.300)]
    end = _run(pace, steps, start=0.0)
    assert pace.decode_s == pytest.approx(0.010) and pace.token_s == pytest.approx(0.0002)
    assert pace.budget(1, 512, now=end) in {1 + 49, 1 + 50}  # 10 ms of 0.2 ms tokens (in floating point)
    # the decode step lastingly twice as long (a grown batch): the budget follows
    end = _run(pace, [(rows, {"a": 1}, 0.020)] * (WINDOW // 2 + 1), start=end + 1.0)
    assert pace.decode_s == pytest.approx(0.020)
    assert pace.budget(1, 512, now=end) in {1 + 99, 1 + 100}


def _run(pace: PrefillPace, steps: list[tuple[dict, dict[str, int], float]], start: float) -> float:
    """``steps`` (requests, scheduled tokens, seconds taken) a second apart from ``start``; when the last ended."""
    at = start
    for requests, scheduled, took in steps:
        _step(pace, requests, scheduled, at=at, took=took)
        end, at = at + took, at + 1.0
    return end


def test_a_step_starts_when_the_one_before_it_ends():
    """With vLLM's async scheduling the next step is scheduled while one runs: its time starts at that one's end."""
    pace = PrefillPace(step_budget=1.0)
    rows = {"a": _request(10, 21)}
    first, second = SimpleNamespace(num_scheduled_tokens={"a": 1}), SimpleNamespace(num_scheduled_tokens={"a": 1})
    pace.scheduled(first, rows, now=0.0)
    pace.scheduled(second, rows, now=0.001)
    pace.finished(first, now=0.010)
    pace.finished(second, now=0.020)
    assert pace.decode_s == pytest.approx(0.010)
    pace.scheduled(SimpleNamespace(num_scheduled_tokens={}), rows, now=0.03)  # an empty step is not measured
    assert not pace._pending
    pace.token_s = 0.0002
    assert pace.budget(1, 512, now=0.0249) == 1 + 25  # 4.9 ms since the last step: about half the budget spent
    pace.scheduled(SimpleNamespace(num_scheduled_tokens={"a": 1}), rows, now=0.025)
    assert pace.budget(1, 512, now=0.026) == 1 + 50  # a step runs: the engine is not idle, nothing spent


def test_rows_whose_attention_is_computed_again_are_costed_apart():
    """A method's rows from its ``recomputed`` row on cost what a step took beyond its decoding rows and its plain
    rows; the next prompt in line gets its plain rows at a plain token's time, then those at theirs."""
    pace = PrefillPace(step_budget=1.0, recomputed_from=_recomputed)
    rows = {"a": _request(10, 21)}
    _step(pace, rows, {"a": 1}, at=0.0, took=0.010)
    _step(pace, {**rows, "plain": _request(600, 50)}, {"a": 1, "plain": 50}, at=0.1, took=0.020)
    assert pace.token_s == pytest.approx(0.0002) and pace.recomputed_s is None
    # a chunk of 20 rows before the method's row 600 and 30 after: 4 ms of plain rows, 12 ms beyond them
    method = _request(700, 630, recomputed=600)
    _step(pace, {**rows, "var": method}, {"a": 1, "var": 50}, at=0.2, took=0.026)
    assert pace.token_s == pytest.approx(0.0002) and pace.recomputed_s == pytest.approx(0.012 / 30)
    at = 0.226
    assert pace.budget(1, 512, now=at, next_request=_request(700, 590, recomputed=600)) == 1 + 10 + 20  # 2 ms, then 8 ms of 0.4 ms
    plain = {1 + 49, 1 + 50}  # 10 ms of 0.2 ms rows (in floating point)
    assert pace.budget(1, 512, now=at, next_request=_request(700, 0, recomputed=600)) in plain  # before its row 600
    assert pace.budget(1, 512, now=at, next_request=_request(100, 0)) in plain
    assert pace.budget(1, 512, now=at) in plain  # nothing in line


def test_a_prompt_tokens_time_is_the_median_of_signed_samples():
    """On a shared CPU a chunk's time beyond the decoding rows' median is within the decode step's own spread, below
    it as often as above: the samples are kept signed (clamped at 0, they pulled the median down to 0; dropped,
    they left only the slow ones), and a median not above 0 leaves the estimate as it was."""
    pace = PrefillPace(step_budget=1.0)
    rows, joined = {"a": _request(10, 21)}, {"a": _request(10, 21), "new": _request(600, 40)}
    steps = [(rows, {"a": 1}, 0.040)] * WINDOW  # chunks of 40 tokens at 0.5 ms each, and +-25 ms of the machine's
    steps += [(joined, {"a": 1, "new": 40}, 0.060 + noise) for noise in (0.020, -0.025, 0.010, -0.021, 0.0, -0.022, 0.024)]
    _run(pace, steps, start=0.0)
    assert pace.token_s == pytest.approx(0.0005)
    hidden = [(joined, {"a": 1, "new": 40}, took) for took in (0.035, 0.038, 0.040, 0.036, 0.039)]
    _run(pace, hidden, start=100.0)
    assert pace.token_s == pytest.approx(0.0005)  # (the median went to 0 and below: nothing measured)


def test_decoding_rows_are_measured_by_their_number():
    """A second decoding row (a method's pass beside the stream) lengthens every step: a chunk's share is what its
    step took beyond a decode-only step of as many rows, and unknown until one has run."""
    pace = PrefillPace(step_budget=1.0)
    one, two = {"a": _request(10, 21)}, {"a": _request(10, 21), "b": _request(10, 30)}
    _run(pace, [(one, {"a": 1}, 0.020)] * 3 + [({**one, "new": _request(600, 40)}, {"a": 1, "new": 40}, 0.040)], 0.0)
    assert pace.token_s == pytest.approx(0.0005)
    beside = {**two, "new": _request(600, 80)}
    _run(pace, [(beside, {"a": 1, "b": 1, "new": 40}, 0.060)] * 3, start=10.0)  # two rows: not known yet
    assert pace.token_s == pytest.approx(0.0005)
    _run(pace, [(two, {"a": 1, "b": 1}, 0.040)] * 3 + [(beside, {"a": 1, "b": 1, "new": 40}, 0.070)], start=20.0)
    assert pace.decode_s == pytest.approx(0.040)
    assert pace.token_s == pytest.approx((0.0005 + 0.030 / 40) / 2)


def test_a_step_takes_at_most_twice_the_prompt_tokens_of_the_last_paced_step():
    """However the estimates move, the prompt tokens beside decoding rows grow at most :data:`GROWTH` times a step,
    so a wrong estimate costs one step of twice the last chunk, which then measures it, never a whole prompt."""
    pace = PrefillPace(step_budget=1.0)
    rows = {"a": _request(10, 21)}
    end = _run(pace, [(rows, {"a": 1}, 0.040)] * 3 + [({**rows, "new": _request(600, 40)}, {"a": 1, "new": 40}, 0.060)], 0.0)
    pace.token_s = 0.00001  # (as if the costs had vanished)
    assert pace.budget(1, 512, now=end) == 1 + GROWTH * 40
    pace.token_s = 0.0005
    assert pace.budget(1, 512, now=end) == 1 + 80  # the pace's 40 ms hold 80 tokens: offered
    tail = {**rows, "new": _request(607, 607)}  # a prompt's tail of 7 tokens takes less than it is offered
    end = _run(pace, [(tail, {"a": 1, "new": 7}, 0.045)], start=end + 1.0)
    pace.token_s = 0.00001
    assert pace.budget(1, 512, now=end) == 1 + GROWTH * 80
    pace.scheduled(SimpleNamespace(num_scheduled_tokens={"a": 1}), rows, now=end)  # decoding alone: no new chunk
    assert pace.budget(1, 512, now=end) == 1 + GROWTH * 80
    assert pace.budget(0, 512, now=end) == 512  # nothing decodes: the cap
