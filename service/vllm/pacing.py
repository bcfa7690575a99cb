"""vLLM's per-step token budget sized in time: newcomers' prompt tokens per step worth ``step_budget`` decode steps.

vLLM's chunked prefill caps the tokens one step runs (``max_num_scheduled_tokens``), and a running stream's gap
while a prompt is split across steps is one decode step plus that step's chunk. A fixed count freezes streams for
different times on different devices, models and batches (on this project's 2-core CPU a 128-token chunk of the
bench model's prompt is about four decode steps). :class:`PrefillPace` measures, in the scheduler, each step's time
from its scheduling to its output, as medians of the last :data:`WINDOW` steps of each kind (a median, so that one
step the machine or the engine core stalled does not move the budget): the decode step's time ``d`` (steps that
only decode, by their number of decoding tokens), a plain prompt token's time ``c`` (what a step with prompt tokens
took beyond ``d`` of as many decoding tokens, per token; signed: :func:`_positive`), and the time of a prompt row
whose attention the worker computes again for a method (from the request's ``recomputed`` row on: over every key
kept, beside vLLM's own; what such a step took beyond ``d`` and its plain rows, per row). While rows decode, a step
then takes the prompt tokens of the next prompt in line that ``step_budget * d`` holds at those costs
(``step_budget * d / c`` plain ones), less the time the engine spent since its last step (paused for the engine
client's tower work: :mod:`~seeright.service.vllm.pauses`), at least :data:`MIN_CHUNK`, at most :data:`GROWTH`
times the last such step's offer, and within the configured cap (``vllm_step_tokens``), so that a running stream's
longest gap is about ``1 + step_budget`` decode steps, as on the transformers engine (``step_budget``:
docs/engines.md); with nothing decoding, or before ``d`` and ``c`` are measured, the cap alone. Prompts that must
run whole, and tails that never fit, still get a step whose budget is raised to hold them
(:mod:`~seeright.service.vllm.scheduling`).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WINDOW = 7  # the last steps of each kind whose median is the estimate
MIN_CHUNK = 16  # the fewest prompt tokens a paced step takes beside decoding rows (a prompt always progresses)
GROWTH = 2  # a paced step's prompt tokens are at most this many times the last paced step's
STEP_BUDGET_KEY = "seeright_step_budget"  # in vLLM's ``additional_config``: ``step_budget``, where the pace is on
PENDING_LIMIT = 8  # steps scheduled and not yet finished that are remembered (async scheduling keeps one or two)


@dataclass(frozen=True)
class StepWork:
    """What one scheduled step runs: decoding rows' tokens and prompt tokens, and when it was scheduled."""

    output: Any  # vLLM's SchedulerOutput
    decode_tokens: int
    prompt_tokens: int
    recomputed_tokens: int  # of the prompt tokens, those whose attention the worker computes again
    scheduled_at: float


class PrefillPace:
    """The prompt tokens a step may take beside its decoding rows, from measured step times (module docstring)."""

    def __init__(self, step_budget: float, recomputed_from: Callable[[Any], int | None] = lambda request: None) -> None:
        self.step_budget = step_budget
        self.recomputed_from = recomputed_from  # a request's first prompt row whose attention is computed again, or None
        self.decode_s: float | None = None  # the last step that only decoded (median of the last ones of as many rows)
        self.token_s: float | None = None  # one plain prompt token's share of a step (median of the last ones)
        self.recomputed_s: float | None = None  # one prompt row's whose attention is computed again (median)
        # decode-only steps' times by their decoding tokens: a prompt's share of a step is what it took beyond a step
        # of as many decoding rows (a second decoding row, a method's pass beside the stream, lengthens every step)
        self._decode_times: dict[int, RecentMedian] = {}
        self._token_times, self._recomputed_times = RecentMedian(), RecentMedian()
        self._pending: deque[StepWork] = deque(maxlen=PENDING_LIMIT)
        self._last_finish = 0.0  # when the last step ended (0: none yet)
        self._last_chunk: int | None = None  # the prompt tokens offered to the last step that ran some beside decoding
        self._offered: int | None = None  # the prompt tokens this step is offered (``budget``), until it is scheduled

    def budget(self, decode_tokens: int, cap: int, now: float | None = None, next_request: Any = None) -> int:
        """This step's token budget with ``decode_tokens`` of decoding rows in it: ``cap`` where nothing decodes or
        nothing is measured yet, else the decoding tokens plus the prompt tokens of ``next_request`` (the next
        prompt in line, if any) that ``step_budget`` decode steps hold, less what the engine spent since its last
        step (a pause for the engine client's tower work, which the running rows waited through too); at least
        :data:`MIN_CHUNK` of them."""
        if decode_tokens == 0 or self.decode_s is None or not self.token_s:
            return cap
        decoding = self._decode_times.get(decode_tokens)  # (as many rows only decoding: measured, or the last measure)
        spare = self.step_budget * (decoding.median if decoding is not None else self.decode_s)
        if self._last_finish and not self._pending:  # (async scheduling schedules a step while one runs: not idle)
            spare -= max(0.0, (time.perf_counter() if now is None else now) - self._last_finish)
        chunk = max(MIN_CHUNK, self._tokens_in(spare, next_request))
        if self._last_chunk is not None:  # (an estimate gone wrong costs one step of twice the last chunk)
            chunk = min(chunk, max(MIN_CHUNK, GROWTH * self._last_chunk))
        self._offered = chunk
        return min(cap, decode_tokens + chunk)

    def _tokens_in(self, spare: float, request: Any) -> int:
        """The prompt tokens of ``request`` that ``spare`` seconds hold: its plain rows at a plain token's time, its
        rows from its ``recomputed_from`` row on at theirs (unknown: all at a plain token's)."""
        if spare <= 0:
            return 0
        first = None if request is None or not self.recomputed_s else self.recomputed_from(request)
        if first is None:
            return int(spare / self.token_s)
        plain = max(0, first - request.num_computed_tokens)
        if spare <= plain * self.token_s:
            return int(spare / self.token_s)
        return plain + int((spare - plain * self.token_s) / self.recomputed_s)

    def scheduled(self, output: Any, requests: dict[str, Any], now: float | None = None) -> None:
        """Note a step vLLM's scheduler just returned (``requests``: its requests by id, already advanced past the
        step's tokens, as vLLM's scheduler leaves them)."""
        decode = prompt = recomputed = 0
        for request_id, n in output.num_scheduled_tokens.items():
            request = requests[request_id]
            before = request.num_computed_tokens - n
            if before >= request.num_prompt_tokens:  # (a preempted request recomputes from 0: prompt work)
                decode += n
                continue
            prompt += n
            if (first := self.recomputed_from(request)) is not None:
                recomputed += max(0, before + n - max(before, first))
        if decode and prompt:  # (what the pace offered: a prompt's tail takes less, and says nothing of the pace)
            self._last_chunk = self._offered or prompt
        self._offered = None
        if decode + prompt:
            at = time.perf_counter() if now is None else now
            self._pending.append(StepWork(output, decode, prompt, recomputed, at))

    def finished(self, output: Any, now: float | None = None) -> None:
        """Note that the step ``output`` described has run: its time updates the averages."""
        now = time.perf_counter() if now is None else now
        while self._pending:
            work = self._pending.popleft()
            if work.output is output:
                self._measure(work, now - max(work.scheduled_at, self._last_finish))
                break
        self._last_finish = now

    def _measure(self, work: StepWork, took: float) -> None:
        if work.prompt_tokens == 0:
            self.decode_s = self._decode_times.setdefault(work.decode_tokens, RecentMedian()).add(took)
            return
        decoding = self._decode_times.get(work.decode_tokens) if work.decode_tokens else None
        if work.decode_tokens and decoding is None:
            return  # the decoding rows' share of this step is not known: no step of as many rows only decoded yet
        beyond = took - (decoding.median if decoding is not None else 0.0)
        if not work.recomputed_tokens:
            self.token_s = _positive(self._token_times.add(beyond / work.prompt_tokens), self.token_s)
        elif self.token_s is not None:  # what the plain rows did not take
            plain = (work.prompt_tokens - work.recomputed_tokens) * self.token_s
            self.recomputed_s = _positive(self._recomputed_times.add((beyond - plain) / work.recomputed_tokens),
                                          self.recomputed_s)


def _positive(median: float, before: float | None) -> float | None:
    """A prompt token's new estimate: ``median`` of its signed samples, or ``before`` where that is not above 0. A
    small chunk's time beyond the decoding rows' median is within the decode step's own spread, below it as often as
    above; kept signed, the median stays where the costs are, and one not above 0 measures nothing (read as 0, it
    made prompt tokens free and the next step took the rest of a prompt at the cap)."""
    return median if median > 0 else before


class RecentMedian:
    """The median of the last :data:`WINDOW` samples of a step's time: one stalled step does not move it."""

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=WINDOW)

    def add(self, sample: float) -> float:
        """Note ``sample``; the median of the samples kept."""
        self._samples.append(sample)
        return self.median

    @property
    def median(self) -> float:
        return statistics.median(self._samples)
