"""Iteration-level (continuous) batching: rows join and leave the running batch between decoding steps.

:class:`RunningBatch` holds the rows being decoded: one left-padded KV cache for all of them, their
attention mask, each row's next position, method states and decoding settings. ``admit(requests)`` runs
the newcomers' admission (check, bind, rewrite, encode, analysis passes; ``Engine.admit``), then one prefill
forward of the newcomers alone, and merges their caches into the running batch (left-padding the shorter
side). ``step()`` runs one decode forward for every running row and returns the rows that finished; their
cache rows are dropped at once. Every forward is either a prefill of newcomers (the hooks' step 0) or a
decode step of the running rows, so each hook's per-row contract (prefill or decode, never the decode
step's number) holds whatever joined when.

Layouts are absolute positions in the padded batch: when the batch is re-padded, each row's method states
are moved to its new layout (``TokenLayout.shifted``) and the forward context is rebuilt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from seeright.interventions.adapters import EncodedPrompt, ModelAdapter
from seeright.interventions.adapters.base import StopForward
from seeright.interventions.methods.base import RequestInputs, RowState
from seeright.interventions.runtime import ForwardContext, Runtime
from seeright.service.admission import image_counts, place_rows
from seeright.service.decoding import RowDecoding, apply_penalties, top_p_filter
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
    tokens: list[int] = field(default_factory=list)
    streamed: list[StreamedToken] = field(default_factory=list)  # with log-probs, when the request asked
    reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    prepared: float = 0.0
    branch: Row | None = None  # the request's contrast branch (HookPoint.LOGITS), a row of its own
    contrast: RowState | None = None  # the state whose method combines the two rows' logits
    parent: Row | None = None  # set on a branch row: the request it belongs to

    @property
    def slots(self) -> int:
        """Cache slots this request can grow to: its prompt and its whole token budget (its branch's too)."""
        own = len(self.prompt.input_ids) + self.decoding.max_new_tokens
        return own + (self.branch.slots if self.branch is not None else 0)

    @property
    def width(self) -> int:
        """Batch rows this request takes (two with a contrast branch)."""
        return 1 + (self.branch is not None)

    def members(self) -> list[Row]:
        """The request's rows in the batch: itself and its branch."""
        return [self] if self.branch is None else [self, self.branch]

    @property
    def cached(self) -> int:
        """Tokens of this row in the cache: the prompt and every generated token but the newest, which the
        next decode step feeds."""
        return len(self.prompt.input_ids) + max(len(self.tokens) - 1, 0)


@dataclass(eq=False)
class ChunkedPrefill:
    """A plain row whose prompt is prefilled a chunk per step before it joins: the merged input embeddings
    (the model's own text + image merge), its position ids, its own cache and how far it got."""

    row: Row
    embeds: torch.Tensor  # [1, T, D]
    position_ids: torch.Tensor  # [..., 1, T]
    positions: torch.Tensor  # [1] next position after the prompt
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0


class RunningBatch:
    """The rows of one engine being decoded together; call from one thread (the scheduler's).

    With ``prefill_chunk`` set, a plain row (no method, no branch) whose prompt is longer than that joining
    while others decode is prefilled ``prefill_chunk`` tokens per step (``ChunkedPrefill``), so a long
    prompt delays each decode step by one chunk's forward at most; rows with methods prefill whole (their
    hooks read or edit the prompt's attention in one prefill forward)."""

    def __init__(self, engine: BatchEngine, prefill_chunk: int | None = None) -> None:
        self.engine = engine
        self.eos = set(engine.eos_token_ids())
        self.prefill_chunk = prefill_chunk
        self.clear()

    def clear(self) -> None:
        """Forget every row and the cache (after a failed step)."""
        self.prefilling: list[ChunkedPrefill] = []
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T] 1 on real tokens
        self.positions: torch.Tensor | None = None  # [B] next position of each row
        self.context: ForwardContext | None = None

    def __len__(self) -> int:
        """Rows decoding or being prefilled in chunks."""
        return len(self.rows) + len(self.prefilling)

    @property
    def cached_tokens(self) -> int:
        """Cache slots held (rows x padded length, and chunks prefilled so far): what a KV budget counts."""
        return (0 if self.mask is None else self.mask.numel()) + sum(p.done for p in self.prefilling)

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
                (lambda: False) if cancelled is None else cancelled[i], started=started, prepared=time.perf_counter())
            for i, (r, inp, s) in enumerate(zip(requests, inputs, states))
        ]
        for row in rows:
            row.generator = _generator(row.decoding, self.engine.device)
            row.contrast = next((s for s in row.states if "contrast_prompt" in s.data), None)
            if row.contrast is not None:
                row.branch = Row(row.request, row.contrast.data["contrast_prompt"], [], row.decoding, parent=row)
        return rows

    def join(self, rows: list[Row]) -> None:
        """Prefill prepared rows (and their contrast branches) together, one forward of these rows alone,
        and add them to the batch."""
        engine = self.engine
        if self.rows and self.prefill_chunk is not None:
            chunked = [row for row in rows if self._chunkable(row)]
            self.prefilling += [self._chunked(row) for row in chunked]
            rows = [row for row in rows if row not in chunked]
            if not rows:
                return
        rows = [member for row in rows for member in row.members()]
        prompts, states = [row.prompt for row in rows], [row.states for row in rows]
        with torch.inference_mode():
            batch = engine.collate(prompts)
            place_rows(prompts, states)
            position_ids, positions = engine.adapter.prefill_positions(batch)
            cache = DynamicCache()
            context = ForwardContext(states, image_counts=image_counts(prompts))
            active = engine.runtime.activate(context) if any(states) else nullcontext()
            with active:
                out = engine.model(**batch, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1)
        self._merge(rows, cache, batch["attention_mask"], positions)
        self._take(rows, out.logits[:, -1])

    def _chunkable(self, row: Row) -> bool:
        return not row.states and row.branch is None and len(row.prompt.input_ids) > self.prefill_chunk

    def _chunked(self, row: Row) -> ChunkedPrefill:
        """The row's merged input embeddings, read where the model hands them to its language model."""
        engine = self.engine
        batch = engine.collate([row.prompt])
        captured: dict[str, torch.Tensor] = {}

        def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured["embeds"] = kwargs["inputs_embeds"]
            raise StopForward

        handle = engine.adapter.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.inference_mode():
                engine.model(**batch, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
        position_ids, positions = engine.adapter.prefill_positions(batch)
        return ChunkedPrefill(row, captured["embeds"], position_ids, positions)

    def _prefill_chunk(self) -> list[Row]:
        """One chunk of the first row being prefilled in chunks; after its last chunk it joins the batch.
        Returns it if it finished (cancelled, or done with its first token)."""
        job = self.prefilling[0]
        if job.row.cancelled():
            self.prefilling.pop(0)
            job.row.reason = "cancelled"
            return [job.row]
        end = min(job.done + self.prefill_chunk, job.embeds.shape[1])
        with torch.inference_mode():
            out = self.engine.model(
                inputs_embeds=job.embeds[:, job.done : end], attention_mask=torch.ones((1, end), dtype=torch.long,
                device=job.embeds.device), position_ids=job.position_ids[..., job.done : end], cache=job.cache,
                use_cache=True, logits_to_keep=1,
            )
        job.done = end
        if end < job.embeds.shape[1]:
            return []
        self.prefilling.pop(0)
        self._merge([job.row], job.cache, torch.ones((1, end), dtype=torch.long, device=job.embeds.device), job.positions)
        return self._take([job.row], out.logits[:, -1])

    @property
    def reserved(self) -> int:
        """Cache slots the running requests may still grow to (prompt plus their whole token budget)."""
        return sum(row.slots for row in self.requests)

    @property
    def requests(self) -> list[Row]:
        """The running requests (rows that are not a request's contrast branch), those being prefilled too."""
        return [row for row in self.rows if row.parent is None] + [p.row for p in self.prefilling]

    def _merge(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Left-pad the running batch's cache or the newcomers' to one length and stack them."""
        if self.cache is None:
            self.rows, self.cache, self.mask, self.positions = list(rows), cache, mask, positions
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            merged = DynamicCache()
            for i, (old, new) in enumerate(zip(self.cache.layers, cache.layers)):
                merged.update(
                    torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)]),
                    torch.cat([_left_pad(old.values, width, 2), _left_pad(new.values, width, 2)]), i,
                )
            self.cache = merged
            self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
            self.positions = torch.cat([self.positions, positions])
            self.rows = [*self.rows, *rows]
        self._relayout()

    def _relayout(self) -> None:
        """Point every row's states at its prompt's place in the padded batch; a new forward context."""
        width = self.mask.shape[1]
        for row in self.rows:
            pad = width - row.cached
            for state in row.states:
                state.layout = row.prompt.layout.shifted(pad)
        states = [row.states for row in self.rows]
        self.context = ForwardContext(states, step=0) if any(states) else None

    # ---- decoding ------------------------------------------------------------------------------------
    def step(self) -> list[Row]:
        """One chunk of a row being prefilled in chunks (if any), then one decode forward for every running
        row; the requests that finished (and left the batch)."""
        finished = self._prefill_chunk() if self.prefilling else []
        return finished + (self._decode() if self.rows else [])

    def _decode(self) -> list[Row]:
        """One decode forward for every running row (one that just finished its chunked prefill included)."""
        engine = self.engine
        ids = torch.tensor([[row.tokens[-1]] for row in self.rows], device=engine.device)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        position_ids = engine.adapter.decode_positions(self.positions)
        with torch.inference_mode():
            active = engine.runtime.activate(self.context) if self.context is not None else nullcontext()
            with active:
                out = engine.model(input_ids=ids, attention_mask=self.mask, position_ids=position_ids, cache=self.cache,
                                   use_cache=True)
        self.positions = self.positions + 1
        return self._take(self.rows, out.logits[:, -1])

    def _take(self, rows: list[Row], logits: torch.Tensor) -> list[Row]:
        """Choose each request's next token (against its contrast branch's logits, if it has one), stream
        it, feed it to its branch too, and drop the rows that are done. Returns the finished requests."""
        at = {id(row): i for i, row in enumerate(rows)}
        for row, scores in zip(rows, logits):
            if row.parent is not None:
                continue
            if row.cancelled():
                row.reason = "cancelled"
            else:
                self._advance(row, scores, None if row.branch is None else logits[at[id(row.branch)]])
            if row.branch is not None:
                row.branch.reason = row.reason
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

    def _choose(self, row: Row, scores: torch.Tensor) -> int:
        decoding = row.decoding
        if decoding.penalized:
            generated = torch.tensor(row.tokens, dtype=torch.long, device=scores.device)
            seen = torch.cat([row.prompt.input_ids.to(scores.device), generated])
            scores = apply_penalties(scores, generated, seen, decoding)
        if not decoding.sampled:
            return int(scores.argmax())
        logits = top_p_filter(scores.float() / decoding.temperature, decoding.top_p)
        return int(torch.multinomial(logits.softmax(-1), 1, generator=row.generator))

    def _stop_reason(self, row: Row, token: int) -> str | None:
        if token in self.eos:
            return "stop"
        if row.decoding.stop and any(s in self.engine.decode_text(row.tokens) for s in row.decoding.stop):
            return "stop"
        if len(row.tokens) >= row.decoding.max_new_tokens:
            return "length"
        return None

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
        trimmed = DynamicCache()
        for i, layer in enumerate(self.cache.layers):
            trimmed.update(layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:], i)
        self.cache, self.mask = trimmed, self.mask[:, start:]
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


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.ndim - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)


def _generator(decoding: RowDecoding, device: torch.device) -> torch.Generator | None:
    if not decoding.sampled:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(decoding.seed if decoding.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    return generator
