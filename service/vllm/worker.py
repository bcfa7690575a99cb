"""vLLM's worker as a second runtime of the hook points: the methods' own hooks on rows of vLLM's flat batch.

vLLM runs every scheduled token of every running request as one flat batch ``[T, hidden]``; the tokens of the
persistent batch's i-th request are ``query_start_loc[i]:query_start_loc[i + 1]``, and its first one sits at
position ``num_computed_tokens[i]``. :class:`HookPoints` is a ``worker_extension_cls``: ``seeright_install``
(called once through ``collective_rpc``) hooks every decoder layer of the language model, and at the first
layer of each forward the runtime maps tokens to the requests whose ``SamplingParams.extra_args["seeright"]``
carry method states (:mod:`seeright.service.vllm.transport`). Requests without them are untouched: vLLM's own
attention kernel, no copy; a forward without any costs a Python call per hooked module.

For a request with states, each hook point calls the methods' own code (:mod:`seeright.interventions.runtime`'s
plans and :func:`~seeright.interventions.runtime.edited_attention`), one request at a time (``n = 1``):

* HIDDEN: a pre-hook on each decoder layer hands the residual stream entering it (vLLM defers the residual add
  into the next layer's norm: ``hidden + residual``) to ``observe_hidden``.
* SCORES / PROBS: a pre-hook on each layer's attention takes the request's queries, keys and values (after
  the rotary embedding) and, where a method asks for probabilities, computes its output explicitly with the
  edits, which a forward hook writes over the attention's. The keys and values of earlier steps come from a copy
  kept for these requests only (from the prefill on, in the layers their hooks read: ``probs_layers``), so the
  explicit attention never reads a backend's paged cache layout. Where the edits write every row of a forward (a
  batch of such requests decoding), the backend's attention computation is skipped; its cache write is not.
* HEADS: a pre-hook on each ``o_proj`` hands the heads' outputs to ``edit_heads``.
* LOGITS: a request with a contrast branch is two vLLM requests (the branch carries only ``{"branch": key}``,
  and its request's ``tail`` where that is 0, runs unedited, and is queued with its request and its prompt's last
  chunk run in the step of its request's by :mod:`seeright.service.vllm.scheduling`). Where the method edits
  the branch's pixels (``branch_from_pixels``), the branch also carries its signed state, and a wrapper of the
  runner's gathering of encoder inputs hands the method the branch's pixel tensors (every image of the branch,
  stacked or concatenated as the model takes them) before vLLM's vision tower runs. A wrapper of the model's
  ``compute_logits`` replaces the request's logits with the method's ``contrast`` of them and the branch's, before
  penalties and sampling, and a forward hook on vLLM's sampler gives the branch the token the request drew, so the
  branch is fed the request's tokens whatever its own sampling settings. A forward holding one without the other
  at the same step fails the request.
* Guided decoding's candidates (:mod:`seeright.service.vllm.candidates`): a candidate request carries a
  :class:`~seeright.service.vllm.sampling.CandidateSampler`; the ``compute_logits`` wrapper keeps its raw logits and
  the sampler hook gives vLLM the token the sampler draws from them. A continuation (its prompt ends with
  ``answered`` tokens of the answer) is read at its prompt forward's last position only, as the decode step of
  that token.

Step 0 is the prefill; step ``k`` the forward of the request's ``k``-th generated token (a continuation's prompt
forward is step ``answered``). A request whose prompt must run whole (:func:`whole_prompt`: its methods edit every
prompt row by what they see at the last, a heads hook with ``heads_from`` 0; a guided-decoding continuation) is
prefilled in one forward (the engine's scheduler, :mod:`seeright.service.vllm.scheduling`, never splits it), unless
its engine client first ran the prompt layer by layer between two steps (``seeright_layered``,
:mod:`seeright.service.vllm.layered`), after which its hooks' choices are made and each row's edit is its own; the
others may be prefilled in chunks across steps, as vLLM's chunked prefill splits plain prompts, with the rows their
hooks act on (:func:`prefill_tail`: the last rows' attention or heads) in one chunk, which the scheduler keeps whole
(a contrast pair's last chunks in one step: the pair is checked where the request samples, its prompt's last chunk and
every step after): their keys and values are kept chunk by chunk, those rows' explicit attention runs over every key
kept, and a hook on the residual stream sees the whole prompt's in that chunk (the earlier chunks' rows kept). No
method request reads a prefix-cache hit, but a guided-decoding continuation (below). A forward that does not fit this
(a preempted request recomputed in one forward, a split prompt that had to be whole, speculative tokens) cannot replay
per-step edits: the request's states are marked failed and its output is refused by the engine client, never returned
silently wrong. States stay until the client collects them (``seeright_collect``) or, unclaimed, until more than
``MAX_UNCLAIMED`` finished requests wait. A guided-decoding candidate's keys and values stay until its client releases
them (``seeright_release``): the next chunk's continuations, which share its prefix-cache salt, start from the kept
candidate's (:meth:`WorkerRuntime._seed`). ``seeright_pause`` holds the engine between two steps for the engine
client's own tower work (:mod:`seeright.service.vllm.pauses`), with the decode forward's time the runtime keeps
(``decode_s``).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from seeright.interventions.methods.base import Hooks, Method, RowState
from seeright.interventions.registry import MethodRegistry
from seeright.interventions.runtime import ForwardContext, Group, edited_attention, keep_mask
from seeright.service.vllm.layered import LayeredPrefill, run_layers, whole_until
from seeright.service.vllm.pacing import RecentMedian
from seeright.service.vllm.sampling import CandidateSampler
from seeright.service.vllm.transport import pack_states, unpack, unpack_states

EXTRA_ARGS_KEY = "seeright"
DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")
MAX_UNCLAIMED = 1024
# finished guided-decoding candidates whose keys and values wait for their chunk's continuations: their client
# releases them chunk by chunk (at most ``candidates + 1`` per guided request); the bound only catches a client that
# never does
MAX_KEPT_CANDIDATES = MAX_UNCLAIMED
DECODE_LOG = 4096  # decode forwards whose times the worker keeps until read (seeright_decode_times)
MAX_LAYERED = 64  # layered prefills under way at once (a client that never finishes one loses its oldest)
PAUSE_MESSAGE = "<qqd"  # a pause's first words to the engine client: its token, forwards run, decode forward's seconds


@dataclass
class Tracked:
    """One request's states in the worker, its keys and values where it needs explicit attention, its failure."""

    context: ForwardContext
    request_id: str
    prompt_len: int
    prefill_kv: frozenset[int] = frozenset()  # the layers whose keys and values a prefill's forward keeps
    decode_kv: frozenset[int] = frozenset()  # those a later step keeps (a subset: the keys run from position 0)
    answered: int = 0  # a guided-decoding continuation: the answer's tokens at the end of its prompt
    chunked: bool = False  # its prompt may be prefilled in chunks (its hooks act on a tail of rows: prefill_tail)
    tail: int = 0  # the first prompt row from which its prompt runs in one chunk (prefill_tail)
    prefilled: int = 0  # prompt tokens run so far
    seeded: int = 0  # a continuation: the positions vLLM's prefix cache answered, whose keys and values it was given
    tokens: list[int] = field(default_factory=list)  # a guided-decoding candidate: its prompt's token ids
    sampler: CandidateSampler | None = None  # a guided-decoding candidate draws its own tokens
    branch: str | None = None  # the key its contrast branch carries
    contrast: RowState | None = None  # the state whose method contrasts its logits with its branch's
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [capacity, H_kv * d]
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    by_head: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # views [1, H_kv, capacity, d]
    stored: dict[int, int] = field(default_factory=dict)  # layer -> positions kept
    streams: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> a split prompt's residual stream so far
    error: str | None = None

    @property
    def states(self) -> list[RowState]:
        return list(self.context.rows[0])

    @property
    def keeps_kv(self) -> bool:
        """Whether any of its forwards keeps keys and values (its hooks ask for attention probabilities)."""
        return bool(self.prefill_kv)

    def kept_layers(self) -> frozenset[int]:
        """The layers whose keys and values its current step keeps."""
        return self.prefill_kv if self.context.step == 0 else self.decode_kv


@dataclass
class Slice:
    """A tracked request's tokens in this forward; the hooks see ``query_start:end`` (all of them, except in a
    continuation's prompt forward, which stands for the decode step of its last token)."""

    tracked: Tracked
    index: int  # the request's row in the persistent batch (and in this forward's logits)
    start: int
    end: int
    first_position: int
    query_start: int = -1

    def __post_init__(self) -> None:
        if self.query_start < 0:
            self.query_start = self.start

    @property
    def end_position(self) -> int:
        """The position after the forward's last token of the request."""
        return self.first_position + self.end - self.start

    @property
    def whole_prompt(self) -> bool:
        """Whether this forward holds the request's whole prompt and nothing else."""
        return self.first_position == 0 and self.end_position == self.tracked.prompt_len

    @property
    def prompt_chunk(self) -> bool:
        """Whether this forward is a prefill's that holds part of the prompt only (the prompt is split)."""
        return self.tracked.context.step == 0 and not self.whole_prompt


def _row_causal(group: Group, layer: int) -> bool:
    """Whether the group's hooks take its states' prompt rows as they come in ``layer`` (``Hooks.row_causal``)."""
    return all(group.hooks.row_causal(s, layer) for s in group.states)


@dataclass
class WorkerRuntime:
    """What the hooks keep between forwards."""

    runner: Any
    key: bytes
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    first_layer: int
    layers: tuple[int, ...] = ()  # the hooked decoder layers
    modules: dict[int, torch.nn.Module] = field(default_factory=dict)  # those layers' modules
    embed: Any = None  # the model's ``embed_input_ids`` (token embeddings, images' scattered in)
    tracked: dict[str, Tracked] = field(default_factory=dict)
    finished: OrderedDict[str, Tracked] = field(default_factory=OrderedDict)
    candidates: OrderedDict[str, Tracked] = field(default_factory=OrderedDict)  # finished, keys and values kept
    released: OrderedDict[str, None] = field(default_factory=OrderedDict)  # released before they finished: not kept
    rows: list[Slice] = field(default_factory=list)
    branch_errors: dict[str, str] = field(default_factory=dict)  # branch key -> why its pixels could not be edited
    num_reqs: int = 0
    pairs: list[tuple[Slice, int]] = field(default_factory=list)  # (request, its branch's row) in this forward
    drawing: list[tuple[Slice, torch.Tensor]] = field(default_factory=list)  # (candidate, its raw logits) this forward
    steps: int = 0  # forwards run
    decode_s: float | None = None  # a forward's time where every request decodes one token (median of the last ones)
    prefills: OrderedDict[str, LayeredPrefill] = field(default_factory=OrderedDict)  # layered prefills under way
    layered_at: int = -1  # the forwards run when a layered prefill's call last ran pieces (any prefill's)
    _layering: bool = False  # the hooks act on a layered prefill's rows (no forward of vLLM's runs)
    _decode_began: float | None = None  # this forward's start, where it is such a forward
    _decode_times: RecentMedian = field(default_factory=RecentMedian)  # of the last such forwards (``decode_s``)
    skippable: frozenset[int] = frozenset()  # layers whose backend attention :meth:`attend` may skip
    _writes: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # this layer's edited rows (first, rows)
    _skip: int | None = None  # the layer whose backend attention this forward skips (every row edited)
    skipped: int = 0  # backend attention computations skipped so far (a layer of a forward each)
    decode_log: deque[float] = field(default_factory=lambda: deque(maxlen=DECODE_LOG))  # since the last read

    # ---- planning --------------------------------------------------------------------------------
    def plan(self, num_tokens: int) -> None:
        """The tracked requests of this forward and their token slices (none for a dummy or profiling forward,
        whose tokens are not the persistent batch's)."""
        runner, batch = self.runner, self.runner.input_batch
        self._retire(runner)
        self.rows, self.pairs, self.num_reqs, self._decode_began = [], [], 0, None
        self.steps += 1
        n = batch.num_reqs
        if n == 0:
            return
        starts = runner.query_start_loc.cpu[: n + 1].tolist()
        if starts[-1] > num_tokens:
            return
        if starts[-1] == n:
            self._decode_began = time.perf_counter()
        self.num_reqs = n
        branches: dict[str, tuple[int, int]] = {}  # branch key -> (row, tokens generated before this forward)
        for i, request_id in enumerate(batch.req_ids[:n]):
            args = self._args(request_id)
            if not args:
                continue
            request = runner.requests[request_id]
            first = int(batch.num_computed_tokens_cpu[i])
            if "states" not in args:  # a contrast branch: plain, only paired with its request
                branches[str(args.get("branch"))] = (i, first + starts[i + 1] - starts[i] - request.num_prompt_tokens)
                continue
            tracked = self.tracked.get(args["key"])
            if tracked is None:
                tracked = self.tracked[args["key"]] = self._track(args, request_id, request.num_prompt_tokens)
                if tracked.sampler is not None:
                    tracked.tokens = list(request.prompt_token_ids or ())
                if first and tracked.error is None and "kv_from" in args:  # a continuation the prefix cache answered
                    tracked.error = self._seed(tracked, args["kv_from"], first)
            row = Slice(tracked, i, starts[i], starts[i + 1], first)
            if tracked.error is None:
                tracked.error = self._step(row)
            if tracked.error is None and tracked.answered and tracked.context.step == tracked.answered:
                row.query_start = row.end - 1
            if tracked.error is None:
                self.rows.append(row)
        for row in self.rows:  # paired where the request samples: its prompt's last chunk, then every step
            if row.tracked.branch is not None and row.end_position >= row.tracked.prompt_len:
                self._pair(row, branches.get(row.tracked.branch))

    def _pair(self, row: Slice, branch: tuple[int, int] | None) -> None:
        """Pair the request with its branch in this forward, or fail it: both must be at the same step."""
        step = row.tracked.context.step
        if (error := self.branch_errors.pop(str(row.tracked.branch), None)) is not None:
            row.tracked.error = f"its contrast branch: {error}"
        elif branch is None or branch[1] != step:
            where = "is not in" if branch is None else f"is at step {branch[1]} in"
            row.tracked.error = (f"its contrast branch {where} the forward of its step {step} (vLLM scheduled them "
                                 "apart: a full step or a preempted branch)")
        else:
            self.pairs.append((row, branch[0]))

    def _track(self, args: dict[str, Any], request_id: str, prompt_len: int, logits: bool = True) -> Tracked:
        """A request's states tracked from its arguments, or its failure; ``logits``: whether its forwards reach the
        logits (a layered prefill's do not: a contrast method's branch has no part in them)."""
        try:
            states = unpack_states(args["states"], self.key)
            sampler = unpack(args["sampler"], self.key) if "sampler" in args else None
        except ValueError as exc:
            return Tracked(ForwardContext([[]]), request_id, prompt_len, error=str(exc))
        answered = int(args.get("answered", 0))
        tail = prefill_tail(states, self.layers)
        decode_kv = probs_layers(states, self.layers, step=1)
        tracked = Tracked(ForwardContext([states]), request_id, prompt_len, decode_kv=decode_kv,
                          prefill_kv=decode_kv | probs_layers(states, self.layers, step=0),
                          answered=answered, chunked=not whole_prompt(args) and tail > 0, tail=tail,
                          sampler=sampler, branch=args.get("branch"),
                          contrast=next((s for s in states if isinstance(s.hooks, Method) and s.hooks.contrasts(s.params)), None))
        if logits and (tracked.branch is None) != (tracked.contrast is None):
            tracked.error = "a contrast method without its branch, or a branch without a contrast method"
        layout = next((s.layout for s in states if s.layout is not None), None)
        if layout is not None and layout.length != prompt_len - answered:
            tracked.error = (f"vLLM's prompt has {prompt_len - answered} tokens before the answer, the layout the "
                             f"methods were prepared on {layout.length}: this model's prompt processing differs between "
                             "the engines")
        return tracked

    def _seed(self, tracked: Tracked, source_key: str, first: int) -> str | None:
        """A guided-decoding continuation whose prompt vLLM's prefix cache answered up to position ``first`` (it
        shares the kept candidate's salt): the kept candidate's keys and values of those positions start its copy
        (the same tokens, run without edits: guided decoding goes with signals only). None, or why it cannot be."""
        tracked.seeded = first
        if not tracked.keeps_kv:
            return None
        source = self.candidates.get(source_key)
        if source is None:
            return (f"vLLM's prefix cache answered {first} prompt positions and no kept candidate holds their keys "
                    "and values")
        drawn = [token.id for token in source.sampler.drawn] if source.sampler is not None else []
        if (source.tokens + drawn)[:first] != tracked.tokens[:first]:
            return "the kept candidate's tokens are not the start of this continuation's prompt"
        for layer in tracked.decode_kv:  # (a continuation's forwards are all steps after the prefill)
            keys = source.keys.get(layer)
            if keys is None or source.stored[layer] < first:
                return (f"the kept candidate holds {source.stored.get(layer, 0)} positions of layer {layer}, the cache "
                        f"answered {first}")
            values = source.values[layer]
            tracked.keys[layer] = keys.new_empty(first + 256, keys.shape[1])
            tracked.values[layer] = values.new_empty(first + 256, values.shape[1])
            tracked.keys[layer][:first], tracked.values[layer][:first] = keys[:first], values[:first]
            tracked.by_head[layer] = self._by_head(tracked.keys[layer]), self._by_head(tracked.values[layer])
            tracked.stored[layer] = first
        return None

    def release(self, keys: Iterable[str]) -> None:
        """Drop finished candidates' keys and values (their chunk's continuations have started, or lost); a candidate
        released before it finished (its request was cancelled) keeps none when it does."""
        for key in keys:
            if self.candidates.pop(key, None) is None:
                self.released[key] = None
                while len(self.released) > MAX_UNCLAIMED:
                    self.released.popitem(last=False)

    @staticmethod
    def _step(row: Slice) -> str | None:
        """Set the request's step for this forward, or say why this forward cannot be replayed exactly. A
        continuation's prompt forward is the step of its last token (``answered``: the transformers engine decodes
        it as one step); the forwards after it, the steps after that. A chunked prefill's forwards are all step 0."""
        tracked, length = row.tracked, row.end - row.start
        if (tracked.context.step == -1 and tracked.seeded and row.first_position == tracked.seeded
                and row.end_position == tracked.prompt_len):  # the rest of a continuation's cached prompt
            tracked.context.step, tracked.prefilled = tracked.answered, tracked.prompt_len
            return None
        if tracked.context.step == -1 and row.whole_prompt:
            tracked.context.step, tracked.prefilled = tracked.answered, length
            return None
        if (tracked.chunked and tracked.context.step in (-1, 0) and row.first_position == tracked.prefilled
                and tracked.prefilled + length <= tracked.prompt_len):
            tracked.context.step, tracked.prefilled = 0, tracked.prefilled + length
            return None
        step = row.first_position - tracked.prompt_len + 1 + tracked.answered
        if length == 1 and step == tracked.context.step + 1 and step > 0:
            tracked.context.step = step
            return None
        return (f"a forward of {length} tokens from position {row.first_position} (prompt {tracked.prompt_len}): a "
                "recomputed (preempted) or partly cached request cannot replay its per-step edits")

    def _retire(self, runner: Any) -> None:
        """Requests that left vLLM wait for their client's ``collect`` (their states only, :meth:`_ended`), the oldest
        dropped past ``MAX_UNCLAIMED``."""
        for key in [k for k, t in self.tracked.items() if t.request_id not in runner.requests]:
            self.finished[key] = self._ended(key)
        while len(self.finished) > MAX_UNCLAIMED:
            self.finished.popitem(last=False)
        if len(self.branch_errors) > MAX_UNCLAIMED:  # branches whose request never ran
            self.branch_errors.clear()

    def _ended(self, key: str) -> Tracked:
        """Stop tracking a request that left vLLM: its copies of keys, values and residual streams go, but a
        guided-decoding candidate's keys and values are kept for its chunk's continuations (``release``)."""
        done = self.tracked.pop(key)
        released = key in self.released
        self.released.pop(key, None)
        if done.sampler is not None and done.keys and done.error is None and not released:
            self.candidates[key] = replace(done, context=ForwardContext([[]]), streams={})
            while len(self.candidates) > MAX_KEPT_CANDIDATES:
                self.candidates.popitem(last=False)
        done.keys, done.values, done.by_head, done.streams = {}, {}, {}, {}
        return done

    def collect(self, key: str) -> bytes | None:
        """A finished request's states (diagnostics, analysis results) and failure, signed; None if unknown."""
        tracked = self.finished.pop(key, None) or (self._ended(key) if key in self.tracked else None)
        if tracked is None:
            return None
        sampler = tracked.sampler.returned() if tracked.sampler is not None else None
        return pack_states([RowState(hooks=Hooks(), data={"error": tracked.error, "sampler": sampler}), *tracked.states],
                           self.key)

    # ---- hooks -----------------------------------------------------------------------------------
    def _wanting(self, wanted: str, layer: int, device: torch.device) -> Iterator[tuple[Slice, list[Group]]]:
        """This forward's live rows whose hooks want ``wanted`` ("hidden" or "heads") in ``layer``, with those groups."""
        for row in self.rows:
            if row.tracked.error is None and (groups := row.tracked.context.groups(wanted, layer, device)):
                yield row, groups

    def on_layer(self, layer: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Decoder layer pre-hook: plan at the first layer; hand the residual stream to HIDDEN hooks."""
        hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
        if layer == self.first_layer and not self._layering:
            self.plan(hidden.shape[0])
        if not self.rows:
            return
        residual = args[2] if len(args) > 2 else kwargs.get("residual")
        stream = None
        for row, groups in self._wanting("hidden", layer, hidden.device):
            if stream is None:
                stream = hidden if residual is None else hidden + residual
            rows = self._prompt_stream(row, layer, stream[row.query_start:row.end], groups)
            if rows is None:
                continue
            for g in groups:
                g.hooks.observe_hidden(layer, rows[None], g.states, row.tracked.context.step)

    @staticmethod
    def _prompt_stream(row: Slice, layer: int, rows: torch.Tensor, groups: list[Group]) -> torch.Tensor | None:
        """The residual stream HIDDEN hooks see in this forward: its own rows, but in a prefill split into chunks the
        prompt's rows so far (each earlier chunk's rows are kept: they are what the whole prompt's forward has there,
        since a hook edits a row before the prompt's tail only on its own), at every chunk for hooks whose rows may
        come in chunks (:meth:`~seeright.interventions.methods.base.Hooks.row_causal`), else at the last chunk only
        (None before)."""
        tracked = row.tracked
        if not row.prompt_chunk:
            return rows
        kept = tracked.streams.pop(layer, None)
        rows = rows.clone() if kept is None else torch.cat([kept, rows])
        if row.end_position < tracked.prompt_len:
            tracked.streams[layer] = rows
            return rows if all(_row_causal(g, layer) for g in groups) else None
        return rows

    def before_attention(self, layer: int, module: torch.nn.Module, args: tuple) -> None:
        """Attention pre-hook: keep the keys and values of tracked requests that need them; compute the attention of
        those whose methods ask for probabilities in this layer, with the edits (written by :meth:`on_attention`).
        Where those edits write every row of the forward, vLLM's own attention is skipped (:meth:`attend`): its
        keys and values still go to the paged cache, which a plain request sharing the prefix may read."""
        self._writes, self._skip = [], None
        if not self.rows:
            return
        query, key, value = args[:3]
        for row in self.rows:
            written = self._edited_rows(row, layer, query, key, value)
            if written is not None:
                self._writes.append(written)
        if sum(new.shape[0] for _, new in self._writes) == query.shape[0] and layer in self.skippable:
            self._skip = layer  # (the rows are disjoint slices of the forward's: together, all of them)

    def _edited_rows(
        self, row: Slice, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[int, torch.Tensor] | None:
        """The request's edited attention outputs in this layer, ``(first row in the forward, [rows, H * d])``, or
        None where it keeps nothing, its hooks only read, or none of its rows here is theirs."""
        tracked, ctx = row.tracked, row.tracked.context
        if not tracked.keeps_kv or tracked.error is not None:
            return None
        if layer not in tracked.kept_layers():
            if ctx.probs_plan(layer, query.device) is not None:  # (a hook whose asking depends on more than the contract)
                tracked.error = (f"layer {layer}'s hooks ask for attention probabilities at step {ctx.step}, where they "
                                 "asked for none when the request was tracked (the prefill's and a decode step's)")
            elif layer in tracked.stored:  # kept for the prefill only
                del tracked.keys[layer], tracked.values[layer], tracked.by_head[layer], tracked.stored[layer]
            return None
        kept = self._keep(tracked, layer, key[row.start:row.end], value[row.start:row.end], row.first_position)
        if kept is None:
            return None
        keys, values = kept
        plan = ctx.probs_plan(layer, query.device)
        if plan is None:
            return None
        # the hooks number a prefill's rows from the prompt's start; a chunk's first row is at its first position
        offset = row.first_position if ctx.step == 0 else 0
        if offset > tracked.tail:
            tracked.error = (f"layer {layer}'s hooks read prompt rows from {tracked.tail} together, the forward "
                             f"starts at position {offset}")
            return None
        q0 = max(plan.q0, offset)  # rows before the forward's: earlier chunks' (hooks that take them as they come)
        rows = row.end - row.query_start - (q0 - offset)  # the rows this forward holds from q0 on
        if rows <= 0:  # a chunk before the rows its hooks act on
            return None
        groups, writes = plan.groups, plan.any_write
        if ctx.step == 0 and row.end_position <= tracked.tail:
            # a chunk before the rows that run together: only the hooks that take rows as they come see its rows
            groups = [g for g in groups if _row_causal(g, layer)]
            if not groups:
                return None
            writes = any(not g.hooks.reads_only(s, layer, 0) for g in groups for s in g.states)
        top = row.end - rows
        q = query[top:row.end].view(1, rows, self.num_heads, self.head_dim).transpose(1, 2)
        keep = None
        if ctx.step == 0:  # causal over the keys kept: the forward's rows are the last of them
            keep = keep_mask(None, plan.rows, q0 - offset, row.end - row.query_start, keys.shape[2], query.device)
        new = edited_attention(groups, q, keys, values if writes else None, keep, self.scaling, layer, ctx.step, q0)
        if new is None or not writes:
            return None
        return top, new.reshape(rows, -1)  # (one request: its rows start at q0)

    def on_attention(self, layer: int, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Attention forward hook: the edited rows :meth:`before_attention` computed, written over the output (a
        tensor the attention module made for this call)."""
        writes, skipped, self._writes, self._skip = self._writes, self._skip == layer, [], None
        if not writes:
            return None
        edited = output if skipped else output.clone()
        for top, new in writes:
            edited[top:top + new.shape[0]] = new if new.dtype == output.dtype else new.to(output.dtype)
        return edited

    def attend(self, layer: int, forward: Any, *args: Any, **kwargs: Any) -> Any:
        """The backend's attention for ``layer`` (``impl.forward``), but not where the edits write every row of this
        forward (:meth:`before_attention`): its ``output`` as it is, which :meth:`on_attention` fills."""
        if self._skip == layer and "output" in kwargs:
            self.skipped += 1
            return kwargs["output"]
        return forward(*args, **kwargs)

    def _keep(
        self, tracked: Tracked, layer: int, key: torch.Tensor, value: torch.Tensor, first: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Append this forward's keys/values ``[t, H_kv * d]`` to the request's copy (rows as they come); all of
        them as ``[1, H_kv, T, d]`` views (None, and the request failed, if the copy has a gap)."""
        t = key.shape[0]
        stored = tracked.stored.get(layer, 0)
        if stored != first:
            tracked.error = f"kept {stored} positions of layer {layer}, the forward starts at {first}"
            return None
        buf_k, buf_v = tracked.keys.get(layer), tracked.values.get(layer)
        if buf_k is None or buf_k.shape[0] < first + t:
            capacity = first + t + 256
            grown_k, grown_v = key.new_empty(capacity, key.shape[1]), value.new_empty(capacity, value.shape[1])
            if buf_k is not None:
                grown_k[:first], grown_v[:first] = buf_k[:first], buf_v[:first]
            tracked.keys[layer], tracked.values[layer] = buf_k, buf_v = grown_k, grown_v
            tracked.by_head[layer] = self._by_head(grown_k), self._by_head(grown_v)
        end = first + t
        buf_k[first:end], buf_v[first:end] = key, value
        tracked.stored[layer] = end
        keys, values = tracked.by_head[layer]
        return keys[:, :, :end], values[:, :, :end]

    def _by_head(self, rows: torch.Tensor) -> torch.Tensor:
        """A kept copy's rows ``[capacity, H_kv * d]`` seen as ``[1, H_kv, capacity, d]`` (a view)."""
        return rows.view(1, rows.shape[0], self.num_kv_heads, self.head_dim).transpose(1, 2)

    def on_heads(self, layer: int, module: torch.nn.Module, args: tuple) -> tuple | None:
        """``o_proj`` pre-hook: the heads' outputs ``[t, H * d]`` of each tracked request to HEADS hooks."""
        if not self.rows:
            return None
        x = args[0]
        edited = None
        for row, groups in self._wanting("heads", layer, x.device):
            groups = [g for g in groups if self._heads_here(row, layer, g)]
            if not groups:
                continue
            if edited is None:
                edited = x.clone()
            heads = edited[row.query_start:row.end].view(1, row.end - row.query_start, self.num_heads, self.head_dim)
            for g in groups:
                heads = g.hooks.edit_heads(layer, heads, g.states, row.tracked.context.step)
            edited[row.query_start:row.end] = heads.reshape(row.end - row.query_start, -1)
        return None if edited is None else (edited, *args[1:])

    @staticmethod
    def _heads_here(row: Slice, layer: int, group: Group) -> bool:
        """Whether ``group``'s heads edit runs in this forward: always, but in a prefill split into chunks, where a
        hook that edits its rows from ``heads_from`` on together runs in the chunk that holds them (it leaves the rows
        before as they are); a hook that wants rows an earlier chunk held fails the request."""
        if not row.prompt_chunk:
            return True
        start = group.hooks.heads_from(group.states[0], layer, 0)  # one request: one state per hooks object
        if start is None:  # each row on its own: every chunk
            return True
        if row.end_position <= start:  # a chunk before the rows it edits
            return False
        if row.first_position > start:
            row.tracked.error = (f"layer {layer} edits heads from prompt row {start}, the forward starts at position "
                                 f"{row.first_position}")
            return False
        return True

    def on_encoder_inputs(self, gather: Any, scheduler_output: Any) -> tuple[list, list, list]:
        """The runner's ``_batch_mm_inputs_from_scheduler``, with the pixels of each branch whose method edits them
        replaced by the method's edit (all of the branch's images at once: its prompt's images are encoded in the
        step that prefills it)."""
        hashes, kwargs, refs = gather(scheduler_output)
        edits: dict[str, list[int]] = {}
        for k, (request_id, _) in enumerate(refs):
            if "pixels" in (self._args(request_id) or {}):
                edits.setdefault(request_id, []).append(k)
        for request_id, ks in edits.items():
            args = self._args(request_id)
            try:
                state = unpack_states(args["pixels"], self.key)[0]
                items = _edited_pixels([kwargs[k][1] for k in ks], state)
            except (ValueError, KeyError, RuntimeError) as exc:
                self.branch_errors[str(args.get("branch"))] = str(exc)
                continue
            for k, item in zip(ks, items):
                kwargs[k] = (kwargs[k][0], item)
        return hashes, kwargs, refs

    def _args(self, request_id: str) -> dict[str, Any] | None:
        """A running request's seeright arguments, or None."""
        return seeright_args(getattr(self.runner.requests.get(request_id), "sampling_params", None))

    def on_logits(self, compute: Any, hidden: torch.Tensor) -> torch.Tensor:
        """The model's ``compute_logits``, with each paired request's logits replaced by its method's contrast of
        them and its branch's (float32, as the transformers engine computes it)."""
        logits = compute(hidden)
        live = [(row, j) for row, j in self.pairs if row.tracked.error is None]
        if logits is None or logits.shape[0] != self.num_reqs:
            self.pairs = []
            return logits
        if live:
            logits = logits.float()
            for row, j in live:
                state = row.tracked.contrast
                logits[row.index] = state.hooks.contrast(logits[row.index].clone(), logits[j].clone(), state)
        self.drawing = [(row, logits[row.index].clone()) for row in self.rows  # (not a prompt's chunk before its last)
                        if row.tracked.sampler is not None and row.tracked.error is None
                        and row.end_position >= row.tracked.prompt_len]
        return logits

    def on_sampled(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        """Sampler forward hook: each paired branch takes the token its request drew; each guided-decoding
        candidate, the token its own sampler draws from the step's raw logits."""
        tokens = output.sampled_token_ids
        if tokens.shape[0] == self.num_reqs:
            for row, j in self.pairs:
                if row.tracked.error is None:
                    tokens[j] = tokens[row.index]
            for row, scores in self.drawing:
                prompt = self.runner.requests[row.tracked.request_id].prompt_token_ids
                tokens[row.index] = row.tracked.sampler.draw(scores, prompt, row.tracked.answered)
        self.pairs, self.drawing = [], []
        if self._decode_began is not None:
            took, self._decode_began = time.perf_counter() - self._decode_began, None
            self.decode_s = self._decode_times.add(took)
            self.decode_log.append(took)

    def layered(self, key: str, begin: dict[str, Any] | None, ratio: float | None,
                drop: bool = False) -> dict[str, Any]:
        """One call of a layered prefill (:mod:`seeright.service.vllm.layered`), run between two steps: ``begin`` (the
        prompt's token ids ``ids``, its images' embeddings ``images``, the signed ``states``) starts it; each call runs
        its next pieces, for ``ratio`` times the decode forward's time at most (one at least; every layer where no
        request runs), after a step of the running requests since any prefill's last pieces ran (a call finding none
        waits, once: vLLM's busy loop steps between two calls unless it has nothing to run). Answers ``{"states": signed
        states}`` once it ran its last layer, ``{"error": why}`` where it cannot run (a fault here never stops vLLM),
        else ``{}``; ``drop`` forgets it."""
        if drop:
            self.prefills.pop(key, None)
            return {}
        try:
            if begin is not None:
                self._without_adapters(len(begin["ids"]))  # (the embedding's adapter layer too)
                self.prefills[key] = self._begin_layered(key, begin)
                while len(self.prefills) > MAX_LAYERED:
                    self.prefills.popitem(last=False)
            prefill = self.prefills.get(key)
            if prefill is None:
                return {"error": f"no layered prefill under way under this key (more than {MAX_LAYERED} at once)"}
            running = self.runner.input_batch.num_reqs > 0
            if running and self.layered_at == self.steps and not prefill.waited:
                prefill.waited = True  # one budget of any prefill's pieces between two steps (a call waits once)
                return {}
            budget = None if not running else ratio * self.decode_s if ratio is not None and self.decode_s else 0.0
            self._without_adapters(prefill.hidden.shape[0])
            saved, self.rows, self._layering = self.rows, [prefill.row], True
            try:
                with torch.inference_mode():
                    run_layers(prefill, self.modules, budget, self.on_layer)
            finally:
                self.rows, self._layering = saved, False
            prefill.waited, self.layered_at = False, self.steps
            tracked = prefill.row.tracked
            if tracked.error is not None:
                raise ValueError(tracked.error)
            if prefill.layer <= prefill.last:
                return {}
            del self.prefills[key]
            return {"states": pack_states(tracked.states, self.key)}
        except Exception as exc:  # noqa: BLE001 (the request then runs in one forward, as before)
            self.prefills.pop(key, None)
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _without_adapters(self, tokens: int) -> None:
        """vLLM's adapter layers set for ``tokens`` tokens without an adapter (they read the rows' adapters of the
        last forward otherwise: the runner sets them at each; the adapters loaded stay as they are)."""
        manager = getattr(self.runner, "lora_manager", None)
        if manager is not None:
            from vllm.lora.layers import LoRAMapping

            manager.set_active_adapters(set(), LoRAMapping((0,) * tokens, (0,), is_prefill=True))

    def _begin_layered(self, key: str, begin: dict[str, Any]) -> LayeredPrefill:
        """A layered prefill's start: the prompt's embeddings entering the first layer, its states tracked at step 0."""
        if getattr(self.runner, "uses_mrope", False):
            raise ValueError("this model's positions are not one per token (M-RoPE)")
        if self.first_layer != 0:
            raise ValueError("this worker holds the language model's layers from layer "
                             f"{self.first_layer} on (pipeline parallel)")
        ids = torch.tensor(begin["ids"], device=self.runner.device)
        tracked = self._track({"states": begin["states"]}, f"seeright-layered-{key}", len(ids), logits=False)
        if tracked.error is not None:
            raise ValueError(tracked.error)
        last = whole_until(tracked.states, self.layers)
        if last is None:
            raise ValueError("no hook of these states edits every prompt row by the last")
        tracked.context.step, tracked.prefilled = 0, len(ids)
        spans = next((s.layout.image_spans for s in tracked.states if s.layout is not None), ())
        images = None if begin.get("images") is None else unpack(begin["images"], self.key)  # [n, tokens, hidden]
        with torch.inference_mode():
            if images is None or not spans:
                hidden = self.embed(ids)
            else:
                mask = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
                for start, end in spans:
                    mask[start:end] = True
                ids = ids.masked_fill(mask, 0)  # (the rows are the images': their placeholder may be out of vocabulary)
                hidden = self.embed(ids, list(images.to(ids.device, self.runner.dtype)), is_multimodal=mask)
        row = Slice(tracked, -1, 0, len(ids), 0)
        return LayeredPrefill(row, hidden, None, torch.arange(len(ids), device=ids.device), self.first_layer, last)

    def pause(self, address: str, token: int, limit_s: float) -> None:
        """Hold the engine between two steps (:mod:`seeright.service.vllm.pauses`): tell the engine client at
        ``address`` this pause's ``token``, the forwards run so far and the decode forward's time, then wait until
        the client closes the connection, ``limit_s`` at most (a client that went away holds nothing)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(limit_s)
            conn.connect(address)
            conn.sendall(struct.pack(PAUSE_MESSAGE, token, self.steps, self.decode_s or 0.0))
            with contextlib.suppress(OSError):  # the limit, or the client gone
                conn.recv(1)


def seeright_args(params: Any) -> dict[str, Any] | None:
    """The seeright arguments of a request's ``SamplingParams`` (``extra_args["seeright"]``), or None."""
    return ((params.extra_args if params is not None else None) or {}).get(EXTRA_ARGS_KEY)


def whole_prompt(args: dict[str, Any] | None) -> bool:
    """Whether a request with these seeright arguments must be prefilled in one forward: its methods' hooks edit
    every prompt row together (``tail`` 0, set by the engine client from the hooks: :func:`prefill_tail`; a contrast
    branch carries its request's 0), or it is a guided-decoding continuation (its prompt forward, mostly answered by
    the prefix cache, is the decode step of its last token). Plain requests and the others, a guided-decoding chunk's
    first candidates too (their samplers draw once the prompt's last chunk has run), may be chunked, their tail in
    one chunk (a contrast pair's members: the last chunks of both in one step, which the scheduler keeps together)."""
    if not args:
        return False
    return bool(args.get("tail") == 0 or args.get("answered"))


def prefill_tail(states: Sequence[RowState], layers: Iterable[int]) -> int:
    """The first prompt row the states' hooks act on together in the prefill, in ``layers``: the first row whose
    attention a hook reads or edits (often the last: the attention the next token is predicted from), unless it takes
    those rows as they come (``row_causal``), or from which a hook edits the heads' outputs together (``heads_from``;
    0 where a row's edit depends on every row's), else the prompt's length. The prompt may be split anywhere before
    it: the rows from it on must be computed in one forward, where their attention is computed over every key kept
    from the chunks before. A hook that reads the residual stream sees the whole prompt's in that forward (the worker keeps the earlier chunks' rows, which a hook edits only row by
    row, as the whole forward does). The language model's hook points only (the vision tower's and the logits' act
    on whole images and on sampled steps); the states carry their prompt's layout."""
    tail = min(s.layout.length for s in states) if states else 0
    for s in states:
        for layer in layers:
            starts = [] if s.hooks.row_causal(s, layer) else [s.hooks.probs_from(s, layer, 0)]
            if s.hooks.wants("heads", s, layer, 0):
                starts.append(s.hooks.heads_from(s, layer, 0))
            tail = min([tail, *(start for start in starts if start is not None)])
    return tail


def recomputed_from(states: Sequence[RowState], layers: Iterable[int]) -> int | None:
    """The first prompt row whose attention the worker computes again for the states' hooks in the prefill (each such
    row costs an attention over every key kept, in each layer that asks), or None."""
    starts = [start for s in states for layer in layers if (start := s.hooks.probs_from(s, layer, 0)) is not None]
    return min(starts, default=None)


def probs_layers(states: Sequence[RowState], layers: Iterable[int], step: int) -> frozenset[int]:
    """The layers in which the states' hooks ask for attention probabilities at ``step`` (0: the prefill; any later
    step asks as step 1 does: what a hook asks depends on the layer and on whether the step is the prefill, as
    :class:`~seeright.interventions.runtime.ForwardContext` plans it). Only those layers' keys and values are kept."""
    return frozenset(layer for layer in layers for s in states if s.hooks.probs_from(s, layer, step) is not None)


def _edited_pixels(items: list[Any], state: RowState) -> list[Any]:
    """vLLM's multi-modal items of one request with ``pixel_values`` edited by ``state``'s method, the request's
    images joined as the transformers engine's processor joins them (stacked, or concatenated for flat fields)."""
    from vllm.multimodal.inputs import MultiModalFlatField, MultiModalKwargsItem

    elems = [item["pixel_values"] for item in items]
    if isinstance(elems[0].field, MultiModalFlatField):
        sizes = [e.data.shape[0] for e in elems]
        parts = state.hooks.edit_branch_pixels(torch.cat([e.data for e in elems]), state).split(sizes)
    else:
        parts = state.hooks.edit_branch_pixels(torch.stack([e.data for e in elems]), state).unbind(0)
    return [MultiModalKwargsItem({**item, "pixel_values": replace(elem, data=part.contiguous())})
            for item, elem, part in zip(items, elems, parts)]


def _language_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The language model's decoder layers by index (vision towers' layers left out)."""
    return {
        int(m.group(1)): module for name, module in model.named_modules()
        if (m := DECODER_LAYER.search(name)) and "vision" not in name and "visual" not in name
        and hasattr(module, "self_attn") and hasattr(module.self_attn, "attn")
    }


def _skippable(attn: torch.nn.Module) -> bool:
    """Whether the attention module's backend computes apart from writing the paged cache (vLLM's
    ``forward_includes_kv_cache_update``; its own layer's cache): :meth:`WorkerRuntime.attend` may then skip the
    computation for a forward whose every row the edits write, and the cache is still written."""
    backend = getattr(attn, "attn_backend", None)
    return (backend is not None and getattr(backend, "forward_includes_kv_cache_update", True) is False
            and getattr(attn, "kv_sharing_target_layer_name", None) is None and hasattr(attn, "impl"))


class HookPoints:
    """Mixed into vLLM's worker (``worker_extension_cls="seeright.service.vllm.worker.HookPoints"``)."""

    def seeright_install(self, key: bytes) -> dict[str, int]:
        """Hook every decoder layer of the language model (once); ``key`` signs the states this worker accepts."""
        if getattr(self, "_seeright", None) is not None:
            return {"layers": len(self._seeright_layers)}
        runner = self.model_runner  # type: ignore[attr-defined]
        config = self.vllm_config  # type: ignore[attr-defined]
        # every method's module imported now, not by the first request of a method whose states are unpickled in a
        # step (CARVE's scipy: some 40 ms of a CPU step that the running rows would wait through)
        MethodRegistry.builtin()
        layers = _language_layers(runner.get_model())
        if not layers:
            raise RuntimeError("no decoder layer with self_attn.attn found: this architecture is not hooked")
        attn = layers[min(layers)].self_attn.attn
        runtime = WorkerRuntime(
            runner, key, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, head_dim=attn.head_size,
            scaling=float(attn.impl.scale), first_layer=min(layers), layers=tuple(sorted(layers)), modules=layers,
            embed=runner.get_model().embed_input_ids,
        )
        handles = []
        for index, layer in layers.items():
            handles += [layer.register_forward_pre_hook(partial(runtime.on_layer, index), with_kwargs=True),
                        layer.self_attn.attn.register_forward_pre_hook(partial(runtime.before_attention, index)),
                        layer.self_attn.attn.register_forward_hook(partial(runtime.on_attention, index)),
                        layer.self_attn.o_proj.register_forward_pre_hook(partial(runtime.on_heads, index))]
        runtime.skippable = frozenset(i for i, layer in layers.items() if _skippable(layer.self_attn.attn))
        for index in runtime.skippable:
            impl = layers[index].self_attn.attn.impl
            impl.forward = partial(runtime.attend, index, impl.forward)
        model = runner.model
        model.compute_logits = partial(runtime.on_logits, model.compute_logits)
        runner._batch_mm_inputs_from_scheduler = partial(runtime.on_encoder_inputs, runner._batch_mm_inputs_from_scheduler)
        handles.append(runner.sampler.register_forward_hook(runtime.on_sampled))
        self._seeright, self._seeright_layers, self._seeright_handles = runtime, layers, handles
        return {"layers": len(layers), "heads": attn.num_heads * config.parallel_config.tensor_parallel_size}

    def seeright_uninstall(self) -> None:
        """Remove the hooks and wrappers (the runner's and model's own methods again); states kept are dropped."""
        if getattr(self, "_seeright", None) is None:
            return
        runner = self.model_runner  # type: ignore[attr-defined]
        for handle in self._seeright_handles:
            handle.remove()
        for index in self._seeright.skippable:
            del self._seeright_layers[index].self_attn.attn.impl.forward  # (set on the instance: the class's again)
        del runner.model.compute_logits  # the wrapper was set on the instance: the class's method again
        del runner._batch_mm_inputs_from_scheduler
        self._seeright = None

    def seeright_collect(self, key: str) -> bytes | None:
        """The states of a finished request (:meth:`WorkerRuntime.collect`)."""
        return self._seeright.collect(key)

    def seeright_release(self, keys: list[str]) -> None:
        """Drop finished guided-decoding candidates' keys and values (:meth:`WorkerRuntime.release`)."""
        self._seeright.release(keys)

    def seeright_pause(self, address: str, token: int, limit_s: float) -> None:
        """Hold the engine between two steps for the engine client's own work (:meth:`WorkerRuntime.pause`; only the
        first worker: the engine waits for them all)."""
        if getattr(self, "rank", 0) == 0 and getattr(self, "_seeright", None) is not None:
            self._seeright.pause(address, token, limit_s)

    def seeright_layered(self, key: str, begin: dict[str, Any] | None, ratio: float | None,
                         drop: bool = False) -> dict[str, Any]:
        """A call of a layered prefill (:meth:`WorkerRuntime.layered`; every worker runs it, the first one answers)."""
        return self._seeright.layered(key, begin, ratio, drop)

    def seeright_threads(self) -> int:
        """The torch threads this worker computes on (on a CPU, the engine client's ``engine_threads``)."""
        return torch.get_num_threads()

    def seeright_skipped(self) -> int:
        """How many layers' backend attention computations the hooks skipped so far (:meth:`WorkerRuntime.attend`)."""
        runtime = getattr(self, "_seeright", None)
        return 0 if runtime is None else runtime.skipped

    def seeright_decode_times(self) -> list[float]:
        """The times of the forwards where every request decoded one token since the last call (the last
        :data:`DECODE_LOG` of them; ``seeright bench --engine vllm`` reads a request's: the worker's share of its
        decode time, without the engine's scheduling and the API process)."""
        runtime = getattr(self, "_seeright", None)
        if runtime is None:
            return []
        times = list(runtime.decode_log)
        runtime.decode_log.clear()
        return times

    def seeright_held(self) -> dict[str, int]:
        """What the hooks hold now: requests tracked, finished requests' unclaimed states, kept candidates, layered
        prefills under way."""
        runtime = getattr(self, "_seeright", None)
        if runtime is None:
            return {}
        return {"tracked": len(runtime.tracked), "unclaimed": len(runtime.finished),
                "candidates": len(runtime.candidates), "layered": len(runtime.prefills)}
