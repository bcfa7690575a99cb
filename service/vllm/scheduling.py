"""vLLM's scheduler with a per-step token budget, prompts that must run whole kept whole, pairs ending together.

With ``vllm_step_tokens`` set, vLLM's chunked prefill is on and each step runs at most that many tokens (the
scheduler's ``max_num_scheduled_tokens``; vLLM's ``max_num_batched_tokens`` stays large enough for the longest
prompt, so that the runner's buffers can hold one whole): the running rows' decode tokens plus newcomers' prompt
tokens; with ``step_budget`` too, fewer while rows decode, one step budget's time of prompt tokens
(:class:`~seeright.service.vllm.pacing.PrefillPace`, timed on the steps this scheduler hands out). vLLM splits plain
prompts across steps by itself. A request whose methods act on its last prompt rows'
attention (``SamplingParams.extra_args["seeright"]["tail"]``, the first of those rows:
:func:`~seeright.service.vllm.worker.prefill_tail`) is split too, but no chunk ends inside those rows: they run in
one chunk. A request whose methods edit every prompt row together (``tail`` 0) must be prefilled in one forward
(:func:`~seeright.service.vllm.worker.whole_prompt`). A request with a contrast branch
(:attr:`~seeright.interventions.methods.base.HookPoint.LOGITS`) is two vLLM requests that must sample their first
token in the same step and then decode in lockstep (both carry the branch's key,
``SamplingParams.extra_args["seeright"]["branch"]``): split, each member's tail (its last row at the latest) runs in
the step its partner's does; whole (the request's tail 0, which its branch carries), both prompts run in one step.
:class:`WholePrompts`:

* keeps a pair's member aside until its partner arrives (the front end sends them one after the other and the
  engine core may run a step in between), then queues them together;
* before each step, takes each group that must run whole (a pair, or one request) whose members all wait
  unstarted, in queue order: a group whose prompts fit what the step has left (request slots, token budget,
  encoder budget, free KV blocks, after the running requests' tokens) goes to the front of the waiting queue; a
  group that could never fit the budget beside the decoding rows goes first in a step whose budget is raised to
  hold it, once no running prompt is still being split (the running streams then wait for that one prefill,
  as they would without a budget); any other group sits the step out, and under first-come-first-served so do the
  requests queued behind it (no one overtakes it, so a stream of plain prompts cannot starve it);
* cuts a split prompt's chunk where its tail begins unless the chunk reaches the prompt's end; a tail that does not
  fit what a step has left waits for a step where it does, and one that could never fit beside the decoding rows
  goes in a step whose budget is raised to hold it, once no other running prompt is still being split, with no
  newcomer in that step;
* ends a split pair's prompts in one step: a member's chunk that would end its prompt is cut where its tail begins
  until both members wait at their tails and the step holds both tails; the pair then goes first in the running
  queue, so that neither is left out of that step (a member that still misses it, e.g. preempted, has its request
  failed by the worker, never decoded out of lockstep);
* drops held members when one of them is aborted.

The room is counted conservatively (no prefix-cache hit assumed). Under vLLM's priority policy the waiting queue is
a heap: a group is ordered by its priority rather than put first, and only the group sits a step out.

``engine_args`` names :func:`seeright_scheduler` as vLLM's ``scheduler_cls``; it builds the async or the plain
scheduler, whichever vLLM's configuration chose.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from seeright.service.vllm.pacing import STEP_BUDGET_KEY, PrefillPace
from seeright.service.vllm.worker import seeright_args, whole_prompt

PAIR_SIZE = 2  # a request and its contrast branch

logger = logging.getLogger(__name__)


def pair_of(request: Request) -> str | None:
    """The key of the pair ``request`` belongs to (the branch's key, which both members carry), or None."""
    branch = (seeright_args(request.sampling_params) or {}).get("branch")
    return None if branch is None else str(branch)


def tail_of(request: Request) -> int | None:
    """The first prompt row from which ``request``'s prompt must run in one chunk, or None (no such row). A contrast
    pair's member has one at its last row at the latest: the forward that samples its first token, which must be its
    partner's too."""
    args = seeright_args(request.sampling_params) or {}
    tail = args.get("tail")
    if "branch" in args:
        last = request.num_prompt_tokens - 1
        tail = last if tail is None else min(tail, last)
    return None if tail is None or tail >= request.num_prompt_tokens else int(tail)


def recomputed_of(request: Request) -> int | None:
    """The first prompt row of ``request`` whose attention the worker computes again for its methods, or None."""
    first = (seeright_args(request.sampling_params) or {}).get("recomputed")
    return None if first is None else int(first)


def whole_group(request: Request) -> str | None:
    """The key of the group ``request`` must start whole with (its pair's, or its own id), or None if vLLM may
    split its prompt."""
    args = seeright_args(request.sampling_params)
    return (pair_of(request) or request.request_id) if whole_prompt(args) else None


@dataclass
class Room:
    """What one step has left for new requests once the running ones decode."""

    slots: int
    tokens: int
    encoder_tokens: int
    blocks: int
    block_size: int

    def take(self, members: list[Request]) -> bool:
        """Reserve room for all of ``members``' prompts; False (nothing reserved) if they do not all fit."""
        tokens = sum(r.num_tokens for r in members)
        encoder = sum(r.get_num_encoder_embeds(i) for r in members for i in range(r.num_encoder_inputs))
        blocks = sum(math.ceil((r.num_tokens + 1) / self.block_size) for r in members)
        if len(members) > self.slots or tokens > self.tokens or encoder > self.encoder_tokens or blocks > self.blocks:
            return False
        self.slots, self.tokens = self.slots - len(members), self.tokens - tokens
        self.encoder_tokens, self.blocks = self.encoder_tokens - encoder, self.blocks - blocks
        return True


class WholePrompts:
    """Mixed into a vLLM scheduler: groups that must run whole start whole, pairs together (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: dict[str, list[Request]] = {}
        self.completing: set[str] = set()  # the split pairs whose tails run in this step, both
        extra = self.vllm_config.additional_config  # type: ignore[attr-defined]
        budget = extra.get(STEP_BUDGET_KEY) if isinstance(extra, dict) else None
        self.pace = None if budget is None else PrefillPace(float(budget), recomputed_of)

    def add_request(self, request: Request) -> None:
        pair = pair_of(request)
        if pair is None:
            super().add_request(request)  # type: ignore[misc]
            return
        members = self.held.setdefault(pair, [])
        members.append(request)
        if len(members) >= PAIR_SIZE:
            for member in self.held.pop(pair):
                super().add_request(member)  # type: ignore[misc]

    def finish_requests(self, request_ids: str | Iterable[str] | None, finished_status: RequestStatus) -> list[Request]:
        if request_ids is None:
            self.held.clear()
        else:
            ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
            for pair, members in list(self.held.items()):
                if any(m.request_id in ids for m in members):
                    del self.held[pair]
            request_ids = ids
        return super().finish_requests(request_ids, finished_status)  # type: ignore[misc]

    def _reserve_prefill_lookahead(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        """vLLM's cut of a prefill chunk, then no chunk that ends inside the request's tail (0: it waits a step), and
        no split pair's member that ends its prompt but in the step its partner does (cut where its tail begins)."""
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)  # type: ignore[misc]
        tail = tail_of(request)
        if tail is None or num_computed_tokens >= request.num_prompt_tokens:  # (decoding)
            return num_new_tokens
        pair = pair_of(request)
        ends = num_computed_tokens + num_new_tokens >= request.num_prompt_tokens
        if ends and (pair is None or pair in self.completing or whole_group(request) is not None):
            return num_new_tokens
        return max(min(num_new_tokens, tail - num_computed_tokens), 0)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        s: Any = self
        cap = s.max_num_scheduled_tokens
        if self.pace is not None:  # the budget in time while rows decode (:mod:`~seeright.service.vllm.pacing`)
            s.max_num_scheduled_tokens = self._paced(
                lambda pace: pace.budget(self._decode_tokens(), cap, next_request=self._next_prompt()), cap)
        held_back: list[Request] = []
        try:
            held_back, raised = self._tail_step()
            if raised is None:
                held_back, raised = self._line_up()
            s.max_num_scheduled_tokens = raised or s.max_num_scheduled_tokens
            output = super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            s.max_num_scheduled_tokens = cap
            self._prepend(held_back)
        if self.pace is not None:
            self._paced(lambda pace: pace.scheduled(output, s.requests), None)
        return output

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        if self.pace is not None:
            self._paced(lambda pace: pace.finished(scheduler_output), None)
        return super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]

    def _decode_tokens(self) -> int:
        """The tokens this step's decoding rows run."""
        s: Any = self
        return sum(r.num_computed_tokens >= r.num_prompt_tokens for r in s.running) * (1 + s.num_spec_tokens)

    def _next_prompt(self) -> Request | None:
        """The next prompt in line: a running one being split first, as vLLM schedules them, else the first waiting."""
        s: Any = self
        return next((r for r in s.running if r.num_computed_tokens < r.num_prompt_tokens), None) or next(iter(s.waiting), None)

    def _paced(self, call: Any, fallback: Any) -> Any:
        """``call(pace)``; a fault in the pace turns it off (logged) and gives ``fallback``: it sizes steps, and an
        error raised in vLLM's scheduler would stop the engine core."""
        try:
            return call(self.pace)
        except Exception:
            logger.exception("the step budget in time failed; steps keep vllm_step_tokens from now on")
            self.pace = None
            return fallback

    def _tail_step(self) -> tuple[list[Request], int | None]:
        """Running prompts that wait with their tail next (a split pair's members: both of them): where the tails do
        not fit beside the decoding rows, once no other running prompt is still being split, this step's budget
        raised to hold them, and every waiting request held back (nothing else starts in that step); else nothing
        held and no raise. The pairs whose tails fit the step go first in the running queue and end their prompts in
        it (:attr:`completing`); the others wait, each member at its tail."""
        s: Any = self
        per_decode = 1 + s.num_spec_tokens
        self.completing = set()
        tails = [r for r in s.running if r.num_computed_tokens == tail_of(r)]
        pairs: dict[str, list[Request]] = {}
        for r in tails:
            if (key := pair_of(r)) is not None:
                pairs.setdefault(key, []).append(r)
        ready = {key: members for key, members in pairs.items() if len(members) == PAIR_SIZE}
        tails = [r for r in tails if pair_of(r) is None or pair_of(r) in ready]
        if not tails:
            return [], None
        waiting_tails = {id(r) for r in tails}
        others = [r for r in s.running if id(r) not in waiting_tails]
        need = per_decode * len(others) + sum(_left(r) for r in tails)
        held: list[Request] = []
        budget = s.max_num_scheduled_tokens
        raise_now = need > budget and not any(r.num_tokens - r.num_computed_tokens > per_decode for r in others)
        if raise_now:
            held, budget = list(s.waiting), min(s.scheduler_config.max_num_batched_tokens, need)
            s.waiting.remove_requests(held)
        room, first = budget - per_decode * len(others), []
        for key, members in ready.items():
            cost = sum(map(_left, members))
            if cost <= room or (raise_now and not first):  # (in a raised step the first goes even if it never fits)
                room -= cost
                self.completing.add(key)
                first += members
        if first:
            ids = {id(r) for r in first}
            s.running[:] = first + [r for r in s.running if id(r) not in ids]
        return held, budget if raise_now else None

    def _line_up(self) -> tuple[list[Request], int | None]:
        """Put the waiting groups that fit this step first in the queue and take out those that sit it out (and,
        first come first served, whatever waits behind them); the requests taken out, in queue order, and this
        step's raised token budget, if a group too large for the budget goes now."""
        s: Any = self
        order = list(s.waiting)
        groups: dict[str, list[Request]] = {}
        for request in order:
            key = whole_group(request)
            if key is not None and request.num_computed_tokens == 0 and request.num_output_tokens == 0:
                groups.setdefault(key, []).append(request)
        complete = [members for members in groups.values() if len(members) == (PAIR_SIZE if pair_of(members[0]) else 1)]
        if not complete:
            return [], None
        s.waiting.remove_requests([r for members in complete for r in members])
        budget, per_decode = s.max_num_scheduled_tokens, 1 + s.num_spec_tokens
        demand = sum(max(per_decode, min(r.num_tokens - r.num_computed_tokens, budget)) for r in s.running)
        decoding = per_decode * len(s.running)
        room = Room(slots=s.max_num_active_reqs - len(s.running), tokens=budget - demand,
                    encoder_tokens=s.max_num_encoder_input_tokens,
                    blocks=s.kv_cache_manager.block_pool.get_num_free_blocks() - len(s.running), block_size=s.block_size)
        admitted: list[Request] = []
        deferred: list[Request] = []
        raised = None
        for members in complete:
            if deferred and self._first_come():
                deferred.extend(members)
                continue
            if room.take(members):
                admitted.extend(members)
                continue
            tokens = sum(r.num_tokens for r in members)
            if not admitted and demand == decoding and tokens > budget - decoding:  # it never fits the budget: it goes alone
                raised, left = min(s.scheduler_config.max_num_batched_tokens, demand + tokens), room.tokens
                room.tokens = raised - demand
                if room.take(members) or not s.running:  # with nothing running it goes regardless (never fits)
                    admitted.extend(members)
                    break
                raised, room.tokens = None, left
            deferred.extend(members)
        taken = {id(r) for r in admitted}
        grouped = {id(r) for members in complete for r in members}
        if raised is not None:  # nothing else starts in that step
            rest = [r for r in order if id(r) not in taken]
            s.waiting.remove_requests([r for r in rest if id(r) not in grouped])
            self._prepend(admitted)
            return rest, raised
        self._prepend(admitted)
        if deferred and self._first_come():  # no one overtakes a group that sits out
            first = min(order.index(r) for r in deferred)
            behind = [r for r in order[first:] if id(r) not in taken]
            s.waiting.remove_requests([r for r in behind if id(r) not in grouped])
            return behind, raised
        held = {id(r) for r in deferred}
        return [r for r in order if id(r) in held], raised

    def _first_come(self) -> bool:
        return isinstance(self.waiting, deque)  # type: ignore[attr-defined]

    def _prepend(self, requests: list[Request]) -> None:
        """Put ``requests`` at the front of the waiting queue, in their order (a priority queue orders them itself)."""
        if requests:
            waiting: Any = self.waiting  # type: ignore[attr-defined]
            waiting.prepend_requests(reversed(requests) if isinstance(waiting, deque) else requests)


def _left(request: Request) -> int:
    """The prompt tokens ``request`` has still to prefill."""
    return request.num_prompt_tokens - request.num_computed_tokens


class SeerightScheduler(WholePrompts, Scheduler):
    """vLLM's scheduler with whole prompts and pairs (:class:`WholePrompts`)."""


class SeerightAsyncScheduler(WholePrompts, AsyncScheduler):
    """vLLM's async scheduler with whole prompts and pairs (:class:`WholePrompts`)."""


def seeright_scheduler(*args: Any, **kwargs: Any) -> Scheduler:
    """The scheduler vLLM's configuration chose (async or not), with whole prompts and pairs."""
    config = kwargs.get("vllm_config", args[0] if args else None)
    cls = SeerightAsyncScheduler if config.scheduler_config.async_scheduling else SeerightScheduler
    return cls(*args, **kwargs)
