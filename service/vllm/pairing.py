"""vLLM's scheduler, starting the two requests of a pair in the same step.

A request with a contrast branch (:attr:`~seeright.interventions.methods.base.HookPoint.LOGITS`) is two vLLM
requests whose logits the worker combines in every forward, so both must be prefilled in the same step and then
decode in lockstep (vLLM schedules every running request in every step). Both carry the branch's key,
``SamplingParams.extra_args["seeright"]["branch"]``. :class:`PairHolding`:

* keeps a member aside until the pair's last member arrives (the front end sends them one after the other and
  the engine core may run a step in between), then queues them together;
* before each step, moves every pair whose members all wait unstarted to the front of the waiting queue if the
  step has room for all of them (request slots, token budget, encoder budget, free KV blocks, after the running
  requests' decode tokens), and keeps the other pairs out of this step, so that vLLM never admits one member and
  stops before the other. A pair is admitted regardless when nothing runs (it could never fit: the worker then
  finds it split and fails the request rather than answer it without its contrast);
* drops held members when one of them is aborted.

The room is counted conservatively (no prefix-cache hit assumed). Under vLLM's priority policy the waiting queue is
a heap, so a pair is ordered by its priority rather than put first.

``engine_args`` names :func:`paired_scheduler` as vLLM's ``scheduler_cls``; it builds the async or the plain
scheduler, whichever vLLM's configuration chose.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from seeright.service.vllm.worker import seeright_args

PAIR_SIZE = 2  # a request and its contrast branch


def pair_of(request: Request) -> str | None:
    """The key of the pair ``request`` belongs to (the branch's key, which both members carry), or None."""
    branch = (seeright_args(request.sampling_params) or {}).get("branch")
    return None if branch is None else str(branch)


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


class PairHolding:
    """Mixed into a vLLM scheduler: the members of a pair start in the same step (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: dict[str, list[Request]] = {}

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

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        deferred = self._line_up_pairs()
        try:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._prepend(deferred)

    def _line_up_pairs(self) -> list[Request]:
        """Put the waiting pairs that fit this step first in the queue; take the others out (returned)."""
        s: Any = self
        pairs: dict[str, list[Request]] = {}
        for request in s.waiting:
            pair = pair_of(request)
            if pair is not None and request.num_computed_tokens == 0 and request.num_output_tokens == 0:
                pairs.setdefault(pair, []).append(request)
        complete = [members for members in pairs.values() if len(members) == PAIR_SIZE]
        if not complete:
            return []
        s.waiting.remove_requests([r for members in complete for r in members])
        running = len(s.running)
        room = Room(slots=s.max_num_active_reqs - running,
                    tokens=s.max_num_scheduled_tokens - running * (1 + s.num_spec_tokens),
                    encoder_tokens=s.max_num_encoder_input_tokens,
                    blocks=s.kv_cache_manager.block_pool.get_num_free_blocks() - running, block_size=s.block_size)
        admitted: list[Request] = []
        deferred: list[Request] = []
        for members in complete:
            fits = room.take(members) or (not admitted and running == 0)
            (admitted if fits else deferred).extend(members)
        self._prepend(admitted)
        return deferred

    def _prepend(self, requests: list[Request]) -> None:
        """Put ``requests`` at the front of the waiting queue, in their order (a priority queue orders them itself)."""
        if requests:
            waiting: Any = self.waiting  # type: ignore[attr-defined]
            waiting.prepend_requests(reversed(requests) if isinstance(waiting, deque) else requests)


class PairedScheduler(PairHolding, Scheduler):
    """vLLM's scheduler with pairs started together (:class:`PairHolding`)."""


class PairedAsyncScheduler(PairHolding, AsyncScheduler):
    """vLLM's async scheduler with pairs started together (:class:`PairHolding`)."""


def paired_scheduler(*args: Any, **kwargs: Any) -> Scheduler:
    """The scheduler vLLM's configuration chose (async or not), with pairs started together."""
    config = kwargs.get("vllm_config", args[0] if args else None)
    cls = PairedAsyncScheduler if config.scheduler_config.async_scheduling else PairedScheduler
    return cls(*args, **kwargs)
