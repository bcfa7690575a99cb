"""Guided decoding on vLLM (:attr:`HookPoint.CANDIDATES`, Lookback Lens): each chunk's candidates as vLLM requests.

On the transformers engine a guided request's candidates are rows of the running batch, and after each chunk
every row takes the kept one's cache row. A running vLLM request cannot take another's KV blocks and tokens, so
here each chunk is ``candidates`` new requests: the prompt's token ids plus the answer so far, with the images,
``max_tokens`` the chunk. Each carries copies of the kept states (the guiding method's reads, the signals'), the
number of answer tokens its prompt ends with (``answered``: the worker reads its prompt forward's last position as
that token's decode step, the forward the transformers engine ran for it), and a
:class:`~seeright.service.vllm.sampling.CandidateSampler` that draws candidate ``i``'s tokens from its own generator
(``seed * 65536 + i``, resumed chunk after chunk). When all are done the method's ``choose`` keeps one; its chunk is
streamed and stops the answer as the transformers engine's batch stops it (EOS, a stop string, the token budget,
a chunk shorter than ``chunk_tokens``).

The first chunk's candidates prefill the prompt, each under a prefix-cache salt of its own. A continuation shares
the kept candidate's salt, so vLLM's prefix cache answers its prompt up to the kept candidate's last computed
block, and names the kept candidate (``kv_from``): the worker starts its copy of every layer's keys and values (the
explicit attention the ratios are read from needs them all) from the kept candidate's, which it holds until the
client releases it (``_release``, once the next chunk is done; the losers' once the chunk is chosen). A chunk
after the first then costs ``candidates`` prefills of the answer's last block or so, not of the whole prompt. Only
methods that edit nothing (signals) may go with guided decoding: re-prefilling the answer would apply a prefill's
edits to tokens that were decoded under per-step edits (:func:`guide_refusal`); for the same reason the cached
blocks, computed without edits, are the continuation's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any, Protocol

from seeright.interventions.lora import Lora
from seeright.interventions.methods.base import HookPoint, Method, RowState
from seeright.service.decoding import candidate_seed, stop_reason
from seeright.service.engine import Engine
from seeright.service.requests import GenerationOutput, GenerationRequest, StreamedToken, add_logprobs, decoding_of
from seeright.service.vllm.sampling import CandidateSampler
from seeright.service.vllm.transport import EngineFailure, pack


class Client(Protocol):
    """What guided decoding uses of :class:`~seeright.service.vllm.engine.VllmEngineClient`."""

    spec: Engine
    _key: bytes

    def _prompt(self, turns: list[Any], images: Sequence[Any]) -> dict[str, Any]: ...

    def _with_states(
        self, prompt: dict[str, Any], states: Sequence[RowState], key: str | None = None,
    ) -> tuple[str, dict[str, Any]]: ...

    def _outputs(self, prompt: dict[str, Any], sampling: Any, lora: Lora | None) -> AsyncIterator[Any]: ...

    async def _collect(self, key: str, sent: Sequence[RowState]) -> tuple[list[RowState], dict[str, Any]]: ...

    async def _release(self, keys: Sequence[str]) -> None: ...


class Output(Protocol):
    """Where the request's output goes (:class:`~seeright.service.vllm.engine.VllmTokenStream`)."""

    output: GenerationOutput | None


def guide_of(states: Sequence[RowState]) -> int | None:
    """The index of the request's guiding state (a method with candidates), or None."""
    return next((i for i, s in enumerate(states) if HookPoint.CANDIDATES in s.hooks.hook_points), None)


def guide_refusal(methods: dict[str, Method], names: Sequence[str]) -> tuple[str, str] | None:
    """``(field, reason)`` when a request asks for a method with candidates beside one that edits the generation."""
    guide = next((n for n in names if HookPoint.CANDIDATES in methods[n].hook_points), None)
    other = next((n for n in names if n != guide and not methods[n].signal), None)
    if guide is None or other is None:
        return None
    reason = (f"{guide} on the vLLM engine goes with signals only: each chunk re-prefills the answer so far, which "
              f"would apply {other}'s prefill edits to tokens decoded under its per-step edits; use the transformers engine")
    return f"interventions.{other}", reason


async def guided(client: Client, request: GenerationRequest, stream: Output, admitted: Any,
                 states: list[RowState], lora: Lora | None, start: float) -> AsyncIterator[StreamedToken]:
    """Stream the kept chunks of a guided request and set ``stream.output``."""
    g = guide_of(states)
    method, p = states[g].hooks, states[g].params
    decoding = replace(decoding_of(request), temperature=p.temperature, top_p=p.top_p)
    base = client._prompt(admitted.turns, admitted.images)
    eos = set(client.spec.eos_token_ids())
    samplers = [CandidateSampler(decoding, seed=candidate_seed(p.seed, i), logprobs=request.logprobs,
                                 top_logprobs=request.top_logprobs) for i in range(method.candidates(p))]
    prepared = time.perf_counter()
    answer: list[int] = []
    streamed: list[StreamedToken] = []
    reason: str | None = None
    held: list[str] = []  # candidates whose keys and values the workers hold for this request
    salt = source = None  # a continuation's prefix-cache salt and the kept candidate it starts from
    try:
        while reason is None:
            budget = min(p.chunk_tokens, decoding.max_new_tokens - len(answer))
            keys = [uuid.uuid4().hex for _ in samplers]
            held += keys
            runs = await asyncio.gather(*(_candidate(client, base, answer, states, sampler, budget, lora, key, salt, source)
                                          for sampler, key in zip(samplers, keys)))
            kept = method.choose([run[1][g] for run in runs], [[t.id for t in run[0].drawn] for run in runs],
                                 [len(run[1][g].data.get("rows", ())) for run in runs])
            await client._release([k for k in held if k != keys[kept]])
            held, salt, source = [keys[kept]], salt or keys[kept], keys[kept]
            samplers = [replace(run[0], drawn=[]) for run in runs]
            chunk, states = runs[kept][0].drawn, runs[kept][1]
            for token in chunk:
                answer.append(token.id)
                streamed.append(token)
                yield token
                reason = stop_reason(decoding, answer, eos, client.spec.decode_text)
                if reason is not None:
                    break
            if reason is None and len(chunk) < p.chunk_tokens:  # the release stops on a short chunk
                reason = "stop"
            method.start_chunk(states[g])
    finally:
        with contextlib.suppress(Exception):  # an engine that has stopped holds nothing
            await client._release(held)
    done = time.perf_counter()
    timings = {"prepare_s": prepared - start, "generate_s": done - prepared, "total_s": done - start}
    out = await asyncio.to_thread(client.spec.finish, answer, None if reason == "length" else reason, decoding,
                                  admitted.prompt, states, timings)
    if request.logprobs:
        add_logprobs(out, streamed, request.top_logprobs)
    stream.output = out


async def _candidate(client: Client, base: dict[str, Any], answer: list[int], states: Sequence[RowState],
                     sampler: CandidateSampler, max_tokens: int, lora: Lora | None, key: str, salt: str | None,
                     source: str | None) -> tuple[CandidateSampler, list[RowState]]:
    """One candidate's chunk under ``key``: its sampler as the worker returned it (the tokens it drew) and its states.
    A continuation takes the prefix-cache ``salt`` of the chain of kept candidates and starts from ``source``'s keys
    and values."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from seeright.service.vllm.worker import EXTRA_ARGS_KEY

    prompt = {**base, "prompt_token_ids": [*base["prompt_token_ids"], *answer]}
    key, extra = client._with_states(prompt, states, key)  # each candidate unpickles a copy of the kept states
    extra.update(answered=len(answer), sampler=pack(sampler, client._key))
    if source is not None:
        prompt["cache_salt"], extra["kv_from"] = salt, source
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                              stop_token_ids=client.spec.eos_token_ids(), output_kind=RequestOutputKind.FINAL_ONLY,
                              extra_args={EXTRA_ARGS_KEY: extra})
    tokens: list[int] = []
    async for out in client._outputs(prompt, sampling, lora):
        tokens.extend(out.outputs[0].token_ids)
    back, status = await client._collect(key, states)
    drew: CandidateSampler = status["sampler"]
    if [t.id for t in drew.drawn] != tokens:
        raise EngineFailure("a guided-decoding candidate's tokens are not the ones its sampler drew")
    return drew, back
