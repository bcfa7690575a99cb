"""A prompt's prefill run layer by layer between vLLM's steps, for hooks that edit every prompt row by the last.

Some hooks edit every row of the prompt by what they see at its last row, layer by layer (VHR chooses each layer's
heads from the last row's head outputs, then scales every row's: He et al., 2025, Alg. 1): no split of the prompt
into chunks of rows computes that, and vLLM runs every layer of a forward at once, so such a prompt's prefill
froze every running stream for its whole length. The worker instead runs the prompt through the language model's
own decoder layers outside vLLM's forward, a few pieces per call between two steps (layers, or a layer's stages
and rows: :func:`run_layers`), the hooks acting on it as in a forward
(:meth:`~seeright.service.vllm.worker.WorkerRuntime.layered`), until the last layer such a hook edits.
The hooks' states then hold what they chose (:meth:`~seeright.interventions.methods.base.Hooks.heads_from` is no
longer 0: each row's edit is its own), and the request goes to vLLM with them, its prefill split into chunks of rows
like any other. The cost: one more forward of the prompt through those layers; the rows' results are those of the
prefill in one forward (only the attention kernel differs: :func:`causal_attention` here, vLLM's backend there).

The engine client (:meth:`~seeright.service.vllm.engine.VllmEngineClient._layered`) sends the prompt's token ids, its
images' embeddings from its own tower (which vLLM then takes too) and the states, and calls again until the worker
answers with the states; a call runs pieces for one step budget (``ratio`` times the decode forward's time) at
most, one at least, and every layer where no request runs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from seeright.interventions.methods.base import RowState

# the wirings the pieces follow: vLLM's Llama and Qwen2 decoder layers (norm, attention, norm, MLP), their attentions
# (whatever leads to the attention module's call, which the pieces capture, then the output projection alone)
SPLIT_LAYERS = frozenset({"LlamaDecoderLayer.forward", "Qwen2DecoderLayer.forward"})
SPLIT_ATTENTION = frozenset({"LlamaAttention.forward", "Qwen2Attention.forward"})
MIN_ROWS = 16  # the fewest rows of a layer's attention or MLP one piece runs (unless the layer's last)
FIRST_ROWS = 64  # the rows of such a piece whose cost is not known yet


@dataclass
class LayeredPrefill:
    """A prompt between two of its pieces: the residual stream entering layer ``layer`` (vLLM's two halves), its
    positions, the last layer it runs; inside a layer run in pieces, its
    stage and what the stages before it left (the queries, keys and values; the attention's output rows so far; the
    MLP's input and output rows so far); each piece's last cost."""

    row: Any  # the worker's Slice of the prompt: all its rows, step 0
    hidden: torch.Tensor
    residual: torch.Tensor | None
    positions: torch.Tensor
    layer: int
    last: int
    waited: bool = False  # the last call ran nothing: it waited for a step of the running requests
    stage: str = "layer"  # "layer" (its start), "attention" (rows), "output", "mlp" (rows)
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    inputs: torch.Tensor | None = None  # the attention's or the MLP's input rows
    outputs: torch.Tensor | None = None  # their output rows so far
    done: int = 0  # rows of ``outputs`` computed
    rows: int = 0  # rows of the stage's last piece
    costs: dict[str, float] = field(default_factory=dict)  # "layer", "qkv", "output"; per "attention pair", "mlp row"


def whole_until(states: Sequence[RowState], layers: Iterable[int]) -> int | None:
    """The last layer in which the states' hooks edit the heads of every prompt row by what they see at the last
    (``heads_from`` 0 in the prefill): a layered prefill runs up to it. None where no hook does."""
    return max((layer for layer in layers for s in states
                if s.hooks.wants("heads", s, layer, 0) and s.hooks.heads_from(s, layer, 0) == 0), default=None)


def causal_attention(num_heads: int, num_kv_heads: int, head_dim: int, scale: float, query: torch.Tensor,
                     key: torch.Tensor, value: torch.Tensor, output_shape: torch.Size | None = None,
                     output_dtype: torch.dtype | None = None, first: int = 0) -> torch.Tensor:
    """vLLM's ``Attention.forward`` for one prompt (no paged cache: its keys are all here): causal attention of
    ``[t, H * d]`` queries, the prompt's rows from ``first`` on, over ``[first + t, H_kv * d]`` keys and values."""
    t, n = query.shape[0], key.shape[0]
    q = query.view(t, num_heads, head_dim).transpose(0, 1)
    k = key.view(n, num_kv_heads, head_dim).transpose(0, 1)
    v = value.view(n, num_kv_heads, head_dim).transpose(0, 1)
    mask = None
    if first:  # row first + i reads the keys up to it
        rows = torch.arange(first, first + t, device=query.device)
        mask = torch.arange(n, device=query.device)[None] <= rows[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=num_kv_heads != num_heads)
    return out.transpose(0, 1).reshape(output_shape or (t, num_heads * head_dim)).to(output_dtype or query.dtype)


def run_layers(prefill: LayeredPrefill, modules: dict[int, torch.nn.Module], budget_s: float | None,
               before_layer: Callable[[int, torch.nn.Module, tuple, dict], None]) -> None:
    """Run the prompt's next pieces: one at least, then while the next is predicted to fit ``budget_s`` (from its last
    cost; None: up to the last layer, whole layers). A piece is a layer, or, in a layer whose wiring is known
    (:data:`SPLIT_LAYERS`), its stages: up to the attention (norm, and, where the attention's wiring is known and no
    hook reads the request's attention, its projections), the attention (over rows of queries, each over the keys up to
    it, as many as the budget holds), the output projection and the next norm, the MLP (over rows: it acts on each row
    alone). ``before_layer`` stands for the decoder layer's forward pre-hook where a layer runs in pieces (the
    worker's: the residual stream to HIDDEN hooks); the attention and output projection are the modules' own calls,
    their hooks included, but for the attention run over rows (no hook acts on it)."""
    began, ran = time.perf_counter(), False
    while prefill.layer <= prefill.last:
        left = math.inf if budget_s is None else budget_s - (time.perf_counter() - began)
        module = modules[prefill.layer]
        if prefill.stage == "layer" and (budget_s is None or type(module).forward.__qualname__ not in SPLIT_LAYERS):
            if ran and prefill.costs.get("layer", 0.0) > left:
                break
            with _timed(prefill, "layer"), _own_attention(module):
                prefill.hidden, prefill.residual = module(prefill.positions, prefill.hidden, prefill.residual)
            prefill.layer += 1
        elif prefill.stage == "layer":
            if ran and prefill.costs.get("qkv", 0.0) > left:
                break
            before_layer(prefill.layer, module, (prefill.positions, prefill.hidden, prefill.residual), {})
            with _timed(prefill, "qkv"), _own_attention(module):
                _to_attention(prefill, module, hooked=prefill.row is not None and prefill.row.tracked.keeps_kv)
        elif prefill.stage == "output":
            if ran and prefill.costs.get("output", 0.0) > left:
                break
            with _timed(prefill, "output"):
                out, _ = module.self_attn.o_proj(prefill.outputs)
                _rows_stage(prefill, "mlp", *module.post_attention_layernorm(out, prefill.residual))
        else:
            rows = _rows(prefill, left, ran)
            if rows is None:
                break
            a, b = prefill.done, prefill.done + rows
            if prefill.stage == "attention":
                q, k, v = prefill.qkv
                attn = module.self_attn.attn
                # (the rows from the first run causal without a mask, a kernel of costs of its own: not a measure)
                with _timed(prefill, "attention pair" if a else "attention start", rows * b):
                    prefill.outputs[a:b] = causal_attention(attn.num_heads, attn.num_kv_heads, attn.head_size,
                                                            float(attn.impl.scale), q[a:b], k[:b], v[:b], first=a)
            else:
                with _timed(prefill, "mlp row", rows):
                    prefill.outputs[a:b] = module.mlp(prefill.inputs[a:b])
            prefill.done, prefill.rows = b, rows
            if b == prefill.outputs.shape[0]:
                if prefill.stage == "attention":
                    prefill.stage, prefill.qkv = "output", None
                else:
                    prefill.hidden, prefill.inputs, prefill.outputs = prefill.outputs, None, None
                    prefill.stage, prefill.layer = "layer", prefill.layer + 1
        ran = True


def _to_attention(prefill: LayeredPrefill, layer: torch.nn.Module, hooked: bool) -> None:
    """A split layer's first stage: its input norm; then, where the attention's wiring is known and no hook acts on
    the request's attention, its projections (the attention runs over rows next), else the attention module and the
    rest of the attention half (the MLP runs next)."""
    if prefill.residual is None:
        hidden, residual = layer.input_layernorm(prefill.hidden), prefill.hidden
    else:
        hidden, residual = layer.input_layernorm(prefill.hidden, prefill.residual)
    attention = layer.self_attn
    if hooked or type(attention).forward.__qualname__ not in SPLIT_ATTENTION:
        out = attention(positions=prefill.positions, hidden_states=hidden)
        _rows_stage(prefill, "mlp", *layer.post_attention_layernorm(out, residual))
        return
    prefill.qkv, prefill.residual = _queries_keys_values(attention, prefill.positions, hidden), residual
    q = prefill.qkv[0]
    prefill.stage, prefill.done, prefill.rows = "attention", 0, 0
    prefill.outputs = q.new_empty(q.shape[0], attention.attn.num_heads * attention.attn.head_size)


def _rows_stage(prefill: LayeredPrefill, stage: str, inputs: torch.Tensor, residual: torch.Tensor) -> None:
    prefill.stage, prefill.inputs, prefill.residual, prefill.done, prefill.rows = stage, inputs, residual, 0, 0
    prefill.outputs = torch.empty_like(inputs)


def _rows(prefill: LayeredPrefill, left: float, ran: bool) -> int | None:
    """The rows the next piece of a row stage runs within ``left`` seconds (at least :data:`MIN_ROWS` or the stage's
    last ones where nothing ran yet; None: none fit), at most twice the stage's last piece (a cost measured on fewer
    rows is no sure guide to many: caches). A piece of the attention costs by its rows times the keys they read
    (the kernel computes the rectangle and masks it)."""
    first, total = prefill.done, prefill.outputs.shape[0]
    cost = prefill.costs.get("attention pair" if prefill.stage == "attention" else "mlp row")
    if cost is not None:
        cost = max(cost, 1e-12)  # (a piece faster than the clock's resolution)
    if math.isinf(left):
        rows = total - first
    elif cost is None:
        rows = 0 if ran else FIRST_ROWS
    elif prefill.stage == "attention":  # rows n with cost * n * (first + n) <= left
        rows = int((-first + math.sqrt(first * first + 4 * max(left, 0.0) / cost)) / 2)
    else:
        rows = int(max(left, 0.0) / cost)
    if not math.isinf(left) and prefill.rows:
        rows = min(rows, 2 * prefill.rows)
    rows = min(max(rows, 0 if ran else MIN_ROWS), total - first)
    return None if rows < min(MIN_ROWS, total - first) else rows


@contextlib.contextmanager
def _timed(prefill: LayeredPrefill, piece: str, units: float = 1.0) -> Iterator[None]:
    """Keep the piece's cost per unit: a dearer one at once, a cheaper one half way (a piece's cost moves from one
    call to the next on a shared machine, and a piece sized on a cheap one overruns the budget)."""
    start = time.perf_counter()
    yield
    cost, last = (time.perf_counter() - start) / units, prefill.costs.get(piece)
    prefill.costs[piece] = cost if last is None else max(cost, (cost + last) / 2)


class _Captured(Exception):  # noqa: N818 (not an error: the attention's inputs, on their way out)
    def __init__(self, qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.qkv = qkv


def _queries_keys_values(attention: torch.nn.Module, positions: torch.Tensor,
                         hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries, keys and values the attention half's own forward hands its attention module (projections, any
    q/k norm, rotary embedding: the model's wiring, whatever it is), captured at that call."""

    def capture(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        raise _Captured((query, key, value))

    try:
        with _attention_forward(attention.attn, capture):
            attention(positions=positions, hidden_states=hidden)
    except _Captured as captured:
        return captured.qkv
    raise RuntimeError(f"{type(attention).__name__} never called its attention module")


def _own_attention(layer: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """The layer's attention module computes :func:`causal_attention` instead of reading vLLM's forward context."""
    attn = layer.self_attn.attn

    def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output_shape: torch.Size | None = None,
                output_dtype: torch.dtype | None = None) -> torch.Tensor:
        return causal_attention(attn.num_heads, attn.num_kv_heads, attn.head_size, float(attn.impl.scale),
                                query, key, value, output_shape, output_dtype)

    return _attention_forward(attn, forward)


@contextlib.contextmanager
def _attention_forward(attn: torch.nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """``attn`` calls ``forward`` instead of its own; what it called before comes back (vLLM's, or an enclosing
    swap's), whatever the call raises."""
    before = vars(attn).get("forward")
    attn.forward = forward
    try:
        yield
    finally:
        if before is None:
            del attn.forward
        else:
            attn.forward = before
