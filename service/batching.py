"""Iteration-level (continuous) batching: rows join and leave the running batch between decoding steps.

:class:`RunningBatch` holds the rows being decoded: one left-padded KV cache for all of them, their
attention mask, each row's next position, method states and decoding settings. A newcomer joins in three
parts: ``prepare`` (check, bind, rewrite, encode, analysis passes; ``Engine.admit``), ``prefill`` (one forward
of the newcomers alone, or one per row) and ``joined`` (their caches merged with the batch's, left-padding the
shorter side); none of them changes the batch, so the scheduler may run them in its admission thread a slice at a time
(:mod:`seeright.service.slicing`). ``install`` then makes the merged batch the running one and takes the
newcomers' first tokens (``admit`` does all of it at once). ``step()`` runs one decode forward for every running
row and returns the rows that finished; their cache rows are dropped at once. Every forward is either a prefill
of newcomers (the hooks' step 0) or a decode step of the running rows, so each hook's per-row contract (prefill
or decode, never the decode step's number) holds whatever joined when.

Layouts are absolute positions in the padded batch: when the batch is re-padded, each row's method states
are moved to its new layout (``TokenLayout.shifted``) and the forward context is rebuilt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from seeright.interventions.adapters import EncodedPrompt, ModelAdapter
from seeright.interventions.lora import Lora
from seeright.interventions.methods.base import HookPoint, RequestInputs, RowState
from seeright.interventions.runtime import ForwardContext, Runtime
from seeright.service.admission import image_counts, place_rows
from seeright.service.decoding import RowDecoding, candidate_seed, choose_token, stop_reason
from seeright.service.growing_cache import DEFAULT_SPARE, DEFAULT_SPARE_ROWS, GrowingCache, Reserved, stacked
from seeright.service.requests import (
    GenerationOutput, GenerationRequest, StreamedToken, add_logprobs, decoding_of, streamed_token,
)


class BatchEngine(Protocol):
    """What the running batch needs of an engine (:class:`seeright.service.engine.Engine` is one): the model
    with its runtime and adapter, admission, batching of prompts and a row's output."""

    model: torch.nn.Module
    runtime: Runtime
    adapter: ModelAdapter
    device: torch.device

    def admit(self, requests: Sequence[GenerationRequest]) -> tuple[list[RequestInputs], list[list[RowState]]]: ...

    def collate(self, prompts: Sequence[EncodedPrompt]) -> dict[str, torch.Tensor]: ...

    def eos_token_ids(self) -> list[int]: ...

    def decode_text(self, ids: list[int]) -> str: ...

    def finish(
        self, generated: list[int], reason: str | None, row: RowDecoding, prompt: EncodedPrompt, states: list[RowState],
        timings: dict[str, float],
    ) -> GenerationOutput: ...


@dataclass(eq=False)  # rows are compared by identity: two rows of equal requests are still two rows
class Row:
    """One running request."""

    request: GenerationRequest
    prompt: EncodedPrompt
    states: list[RowState]
    decoding: RowDecoding
    on_token: Callable[[StreamedToken], None] | None = None
    cancelled: Callable[[], bool] = lambda: False
    generator: torch.Generator | None = None
    lora: Lora | None = None  # the request's LoRA adapter (its branch's and candidates' too)
    tokens: list[int] = field(default_factory=list)
    streamed: list[StreamedToken] = field(default_factory=list)  # with log-probs, when the request asked
    reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    prepared: float = 0.0
    branch: Row | None = None  # the request's contrast branch (HookPoint.LOGITS), a row of its own
    contrast: RowState | None = None  # the state whose method combines the two rows' logits
    parent: Row | None = None  # set on a branch or candidate row: the request it belongs to
    candidates: list[Row] = field(default_factory=list)  # the request's other candidate rows (HookPoint.CANDIDATES)
    guide: int | None = None  # index in ``states`` of the method that keeps one candidate per chunk
    chunk: list[StreamedToken] = field(default_factory=list)  # a candidate's tokens of the current chunk
    chunk_rows: int = 0  # decode forwards that made them (their ratio rows)
    open: bool = True  # a candidate still sampling its chunk (not at EOS, chunk end or budget)

    @property
    def slots(self) -> int:
        """Cache slots this request can grow to: its prompt and its whole token budget (its branch's and
        candidates' too)."""
        own = len(self.prompt.input_ids) + self.decoding.max_new_tokens
        return own * (1 + len(self.candidates)) + (self.branch.slots if self.branch is not None else 0)

    @property
    def width(self) -> int:
        """Batch rows this request takes (two with a contrast branch, one per candidate)."""
        return len(self.members())

    def members(self) -> list[Row]:
        """The request's rows in the batch: itself, its candidates and its branch."""
        return [self, *self.candidates, *([] if self.branch is None else [self.branch])]

    @property
    def cached(self) -> int:
        """Tokens of this row in the cache: the prompt and every generated token but the newest, which the
        next decode step feeds."""
        return len(self.prompt.input_ids) + max(len(self.tokens) - 1, 0)


@dataclass(eq=False)
class Prefilled:
    """Newcomers' prefill, computed apart from the running batch (possibly in an admission's own thread,
    :mod:`seeright.service.slicing`) and merged into it by :meth:`RunningBatch.attach`."""

    rows: list[Row]  # every member row (requests, their candidates and branches)
    cache: GrowingCache
    mask: torch.Tensor  # [n, T]
    positions: torch.Tensor  # [n] next position of each row
    logits: torch.Tensor  # [n, V] at each row's last prompt position


@dataclass(eq=False)
class Joined:
    """The running batch with prefilled newcomers merged in (:meth:`RunningBatch.joined`), and the cache it was
    built from (``base``)."""

    base: GrowingCache | None
    rows: list[Row]
    cache: GrowingCache
    mask: torch.Tensor
    positions: torch.Tensor
    prefills: list[Prefilled]

    @property
    def newcomers(self) -> list[Row]:
        """The prefilled rows, in the order of their logits (a request's branch may be in another prefill)."""
        return [row for p in self.prefills for row in p.rows]


class RunningBatch:
    """The rows of one engine being decoded together. ``prepare``, ``prefill`` and ``joined`` change no batch
    state, so an admission may run them in its own thread between the scheduler's decode steps (never during
    one); ``install``, ``step`` and the rest belong to the scheduler's thread."""

    def __init__(self, engine: BatchEngine, spare_rows: int = DEFAULT_SPARE_ROWS, spare: int = DEFAULT_SPARE) -> None:
        """``spare_rows``: rows of room in the cache, so that a newcomer joins without a copy of the running rows, on a
        CPU only (where that copy costs a running stream a decode step's time, and rows of room never written take no
        memory); ``spare``: token slots of room per row (a copy of the cache each time they run out)."""
        self.engine = engine
        self.eos = set(engine.eos_token_ids())
        self.spare_rows = spare_rows if torch.device(engine.device).type == "cpu" else 0
        self.spare = spare
        self.clear()

    def clear(self) -> None:
        """Forget every row and the cache (after a failed step)."""
        self.rows: list[Row] = []
        self.cache: GrowingCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T] 1 on real tokens
        self.positions: torch.Tensor | None = None  # [B] next position of each row
        self.context: ForwardContext | None = None

    def __len__(self) -> int:
        """Rows decoding."""
        return len(self.rows)

    @property
    def cached_tokens(self) -> int:
        """Cache slots held (rows x padded length): what a KV budget counts."""
        return 0 if self.mask is None else self.mask.numel()

    # ---- joining -------------------------------------------------------------------------------------
    def admit(
        self,
        requests: Sequence[GenerationRequest],
        on_token: Sequence[Callable[[StreamedToken], None] | None] | None = None,
        cancelled: Sequence[Callable[[], bool]] | None = None,
    ) -> list[Row]:
        """Prepare ``requests`` and join them to the running batch at once (their first token included)."""
        rows = self.prepare(requests, on_token, cancelled)
        self.join(rows)
        return rows

    def prepare(
        self,
        requests: Sequence[GenerationRequest],
        on_token: Sequence[Callable[[StreamedToken], None] | None] | None = None,
        cancelled: Sequence[Callable[[], bool]] | None = None,
    ) -> list[Row]:
        """What a row needs before it can join: checks, method passes and encoding (``Engine.admit``)."""
        started = time.perf_counter()
        with torch.inference_mode():
            inputs, states = self.engine.admit(requests)
        rows = [
            Row(r, inp.prompt, s, decoding_of(r), None if on_token is None else on_token[i],
                (lambda: False) if cancelled is None else cancelled[i], lora=inp.lora, started=started,
                prepared=time.perf_counter())
            for i, (r, inp, s) in enumerate(zip(requests, inputs, states))
        ]
        for row in rows:
            row.generator = _generator(row.decoding, self.engine.device)
            row.contrast = next((s for s in row.states if "contrast_prompt" in s.data), None)
            if row.contrast is not None:
                row.branch = Row(row.request, row.contrast.data["contrast_prompt"], [], row.decoding, lora=row.lora, parent=row)
            row.guide = next((i for i, s in enumerate(row.states) if HookPoint.CANDIDATES in s.hooks.hook_points), None)
            if row.guide is not None:
                self._candidates(row)
        return rows

    def _candidates(self, row: Row) -> None:
        """The request's candidate rows: the same prompt, copies of its states, the guiding method's sampling, and
        a sampler each (candidate i draws from ``seed * 65536 + i``; the request's own row is candidate 0)."""
        guide = row.states[row.guide]
        p = guide.params
        row.decoding = replace(row.decoding, temperature=p.temperature, top_p=p.top_p)
        row.candidates = [
            Row(row.request, row.prompt, [replace(s, data=dict(s.data), diagnostics=dict(s.diagnostics)) for s in row.states],
                row.decoding, lora=row.lora, parent=row)
            for _ in range(1, guide.hooks.candidates(p))
        ]
        for i, member in enumerate([row, *row.candidates]):
            member.generator = torch.Generator(device=self.engine.device).manual_seed(candidate_seed(p.seed, i))

    def join(self, rows: list[Row]) -> None:
        """Prefill prepared rows (and their contrast branches and candidates) together and add them to the batch."""
        self.install(self.joined(self.prefill(rows)))

    def prefill(self, rows: list[Row], apart: bool = False) -> list[Prefilled]:
        """Prefill prepared rows (with their branches and candidates) alone, the batch untouched: one forward of
        them all, or with ``apart`` one forward per row (a request's contrast branch and candidates included), so
        that a sliced admission's segments hold one row's work (:mod:`seeright.service.slicing`)."""
        members = [member for row in rows for member in row.members()]
        groups = [[m] for m in members] if apart else [members]
        # the first prefill's cache may become the batch's (when it is empty): it takes the batch's spare rows; the
        # others are merged into a batch's cache and dropped, and take no more than the running batch's default
        return [self._prefill(group, self.spare_rows if i == 0 else min(self.spare_rows, DEFAULT_SPARE_ROWS))
                for i, group in enumerate(groups)]

    def _prefill(self, rows: list[Row], spare_rows: int) -> Prefilled:
        """One prefill forward of ``rows``, into a cache with ``spare_rows`` rows of room."""
        engine = self.engine
        prompts, states = [row.prompt for row in rows], [row.states for row in rows]
        with torch.inference_mode():
            batch = engine.collate(prompts)
            place_rows(prompts, states)
            position_ids, positions = engine.adapter.prefill_positions(batch)
            cache = GrowingCache(self.spare, spare_rows)
            context = ForwardContext(states, image_counts=image_counts(prompts), loras=[row.lora for row in rows])
            active = nullcontext() if context.idle else engine.runtime.activate(context)
            with active:
                out = engine.model(**batch, position_ids=position_ids, **{engine.cache_argument: cache}, use_cache=True,
                                   logits_to_keep=1)
        return Prefilled(rows, cache, batch["attention_mask"], positions, out.logits[:, -1])

    def reserve(self, prefills: Sequence[Prefilled], between: Callable[[], None] = lambda: None) -> Reserved | None:
        """Make resident the cache memory that merging ``prefills`` will write (``GrowingCache.reserve``: a fresh
        page's first write costs a page fault, more than the copy on a CPU), ``between`` running before each layer;
        changes nothing a decode step sees. For :meth:`joined`."""
        if self.cache is None:
            return None
        with torch.inference_mode():
            return self.cache.reserve(sum(len(p.rows) for p in prefills), self._width(prefills), between)

    def _width(self, prefills: Sequence[Prefilled]) -> int:
        """The batch's length with ``prefills`` merged in (every row left-padded to it)."""
        return max([p.mask.shape[1] for p in prefills] + ([] if self.mask is None else [self.mask.shape[1]]), default=0)

    def joined(self, prefills: Sequence[Prefilled], reserved: Reserved | None = None) -> Joined:
        """The batch with ``prefills`` merged in (caches left-padded to one length and stacked; into the memory of
        :meth:`reserve` where it still fits), computed without changing the batch: an admission's thread builds it,
        the scheduler's installs it with no step between."""
        rows, cache, mask, positions = self.rows, self.cache, self.mask, self.positions
        width = self._width(prefills)
        for p in prefills:
            if cache is None:
                rows, cache, mask, positions = list(p.rows), p.cache, p.mask, p.positions
                continue
            with torch.inference_mode():  # it may write into the running cache's spare rows
                rows, cache = [*rows, *p.rows], cache.with_rows(p.cache, width, reserved)
            reserved = None  # the first merge took the new buffers, with room for the other prefills' rows
            mask = stacked(mask, p.mask, width, 1)
            positions = torch.cat([positions, p.positions])
        return Joined(self.cache, rows, cache, mask, positions, list(prefills))

    def install(self, joined: Joined) -> None:
        """Make ``joined`` the batch and take its newcomers' first tokens; rebuilt here if the batch changed since
        it was built."""
        if joined.base is not self.cache:
            joined = self.joined(joined.prefills)
        self.rows, self.cache, self.mask, self.positions = joined.rows, joined.cache, joined.mask, joined.positions
        self._relayout()
        self._take(joined.newcomers, torch.cat([p.logits for p in joined.prefills]))

    @property
    def reserved(self) -> int:
        """Cache slots the running requests may still grow to (prompt plus their whole token budget)."""
        return sum(row.slots for row in self.requests)

    @property
    def requests(self) -> list[Row]:
        """The running requests (rows that are not a request's contrast branch or candidate)."""
        return [row for row in self.rows if row.parent is None]

    def _relayout(self) -> None:
        """Point every row's states at its prompt's place in the padded batch; a new forward context."""
        width = self.mask.shape[1]
        for row in self.rows:
            pad = width - row.cached
            for state in row.states:
                state.layout = row.prompt.layout.shifted(pad)
        context = ForwardContext([row.states for row in self.rows], step=0, loras=[row.lora for row in self.rows])
        self.context = None if context.idle else context

    # ---- decoding ------------------------------------------------------------------------------------
    def step(self) -> list[Row]:
        """One decode forward for every running row; the requests that finished (and left the batch)."""
        engine = self.engine
        ids = torch.tensor([[row.tokens[-1]] for row in self.rows], device=engine.device)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        position_ids = engine.adapter.decode_positions(self.positions)
        with torch.inference_mode():
            active = engine.runtime.activate(self.context) if self.context is not None else nullcontext()
            with active:
                out = engine.model(input_ids=ids, attention_mask=self.mask, position_ids=position_ids,
                                   **{engine.cache_argument: self.cache}, use_cache=True)
        self.positions = self.positions + 1
        return self._take(self.rows, out.logits[:, -1], decoded=True)

    def _take(self, rows: list[Row], logits: torch.Tensor, decoded: bool = False) -> list[Row]:
        """Choose each request's next token (against its contrast branch's logits, if it has one), stream
        it, feed it to its branch too, and drop the rows that are done; a request with candidates samples each
        and, at a chunk's end, keeps one. Returns the finished requests."""
        at = {id(row): i for i, row in enumerate(rows)}
        for row, scores in zip(rows, logits):
            if row.parent is not None:
                continue
            if row.cancelled():
                row.reason = "cancelled"
            elif row.candidates:
                self._sample_candidates(row, logits, at, decoded)
            else:
                self._advance(row, scores, None if row.branch is None else logits[at[id(row.branch)]])
            for member in row.members()[1:]:
                member.reason = row.reason
        finished = [row for row in self.rows if row.reason is not None]
        if finished:
            self._drop(finished)
        return [row for row in finished if row.parent is None]

    def _advance(self, row: Row, scores: torch.Tensor, branch: torch.Tensor | None) -> None:
        """One token for ``row`` from its step's logits."""
        if branch is not None:
            scores = row.contrast.hooks.contrast(scores.float(), branch.float(), row.contrast)
        token = self._choose(row, scores)
        row.tokens.append(token)
        streamed = streamed_token(token, scores, row.request)
        if row.request.logprobs:
            row.streamed.append(streamed)
        if row.on_token is not None:
            row.on_token(streamed)
        if row.branch is not None:
            row.branch.tokens.append(token)
        row.reason = self._stop_reason(row, token)

    def _sample_candidates(self, row: Row, logits: torch.Tensor, at: dict[int, int], decoded: bool) -> None:
        """One token for each of the request's open candidates (a closed one repeats its last token, drawing
        nothing); once none is open, the guiding method keeps one chunk, which is streamed."""
        members = [row, *row.candidates]
        chunk_tokens = row.states[row.guide].params.chunk_tokens
        for member in members:
            if not member.open:
                member.tokens.append(member.tokens[-1])  # keeps its cache in step with the others'; never kept
                continue
            scores = logits[at[id(member)]]
            token = self._choose(member, scores)
            member.tokens.append(token)
            member.chunk.append(streamed_token(token, scores, row.request))
            member.chunk_rows += decoded
            member.open = not (token in self.eos or len(member.chunk) == chunk_tokens
                               or len(member.tokens) >= member.decoding.max_new_tokens)
        if any(member.open for member in members):
            return
        guide = row.states[row.guide].hooks
        kept = members[guide.choose([m.states[row.guide] for m in members], [[t.id for t in m.chunk] for m in members],
                                    [m.chunk_rows for m in members])]
        chunk, steps = kept.chunk, max(len(m.chunk) for m in members)  # a candidate closed at EOS repeats it after
        self._adopt(members, kept)
        row.tokens = row.tokens[: len(row.tokens) - steps]
        for streamed in chunk:
            row.tokens.append(streamed.id)
            if row.request.logprobs:
                row.streamed.append(streamed)
            if row.on_token is not None:
                row.on_token(streamed)
            row.reason = self._stop_reason(row, streamed.id)
            if row.reason is not None:
                return
        if len(chunk) < chunk_tokens:  # the release stops on a short chunk
            row.reason = "stop"
            return
        for member in members:
            member.chunk, member.chunk_rows, member.open = [], 0, True
            guide.start_chunk(member.states[row.guide])

    def _adopt(self, members: list[Row], kept: Row) -> None:
        """Every candidate row takes ``kept``'s cache row, mask, position, tokens and method states."""
        index = {id(r): i for i, r in enumerate(self.rows)}
        source = index[id(kept)]
        others = [m for m in members if m is not kept]
        target = torch.tensor([index[id(m)] for m in others], device=self.mask.device)
        with torch.inference_mode():
            for tensor in (*(t for layer in self.cache.layers for t in (layer.keys, layer.values)), self.mask, self.positions):
                tensor[target] = tensor[source].clone()  # a clone: the source row must not alias the rows written
        for member in others:
            member.tokens = list(kept.tokens)
            for mine, theirs in zip(member.states, kept.states):
                mine.data, mine.diagnostics = deepcopy(theirs.data), deepcopy(theirs.diagnostics)

    @staticmethod
    def _choose(row: Row, scores: torch.Tensor) -> int:
        return choose_token(scores, row.decoding, row.prompt.input_ids, row.tokens, row.generator)

    def _stop_reason(self, row: Row, token: int) -> str | None:
        """Why ``row`` stops after ``token``, the last of its tokens (:func:`stop_reason`)."""
        return stop_reason(row.decoding, row.tokens, self.eos, self.engine.decode_text)

    def _drop(self, finished: list[Row]) -> None:
        """Remove finished rows and their cache rows; trim padding that no row needs any more."""
        keep = [i for i, row in enumerate(self.rows) if row.reason is None]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.positions = self.context = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.positions = self.mask.index_select(0, index), self.positions.index_select(0, index)
        start = int(self.mask.shape[1] - max(row.cached for row in self.rows))
        with torch.inference_mode():
            self.cache, self.mask = self.cache.rows(index, start), self.mask[:, start:]
        self._relayout()

    def output(self, row: Row) -> GenerationOutput:
        """A finished row's output, as the static path builds it."""
        done = time.perf_counter()
        timings = {"prepare_s": row.prepared - row.started, "generate_s": done - row.prepared, "total_s": done - row.started}
        reason = None if row.reason == "length" else row.reason
        out = self.engine.finish(row.tokens, reason, row.decoding, row.prompt, row.states, timings)
        if row.request.logprobs:
            add_logprobs(out, row.streamed, row.request.top_logprobs)
        return out


def _generator(decoding: RowDecoding, device: torch.device) -> torch.Generator | None:
    if not decoding.sampled:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(decoding.seed if decoding.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    return generator
