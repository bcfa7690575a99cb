"""The runtime: one attention function, ``o_proj`` pre-hooks and a per-forward context.

``Runtime(model, adapter)`` registers the attention function ``"seeright"`` with transformers'
``AttentionInterface`` (and SDPA's mask builder under the same name in ``AttentionMaskInterface``, without
which the causal mask silently disappears) and switches the language model to it. While a context is
active it installs the hooks that context's methods need, and only those:

* a pre-hook on each decoder layer, which hands the residual stream entering the layer to methods that
  observe it (VAR's sink detection);
* a pre-hook on each ``o_proj``, which lets methods scale per-head outputs before the output projection
  (VHR);
* a pre-hook on the language model that counts forwards (step 0 is the prefill);
* for analysis passes, a hook that ends the forward after the last layer they read;
* where a row masks image tokens in the vision tower (VE masking), the adapter's hooks on the tower's
  layers (attention outputs zeroed or keys hidden), with every other row's images left unmasked;
* where a row carries a LoRA adapter, forward hooks that add its low-rank delta to its own rows of each adapted
  linear layer (:mod:`seeright.interventions.lora`).

``Runtime.register_progress_hook`` adds a callback that code run on the model calls with where it is: the attention
function with ``"text attention start"`` first, then, where rows are recomputed with edits, ``"text attention
scores"`` and ``"text attention probs"`` after each of those; the engine's admission between its stages (the
scheduler's slicer pauses an admission there: :mod:`seeright.service.slicing`).

The attention function runs SDPA for the rows of the batch that need no attention probabilities in this
layer, and recomputes eagerly the rows that do, for their needed query rows only (at decode one row per
sequence, at prefill e.g. the text rows after the image); the methods edit them (pre-softmax scores, then
probabilities), and the result becomes
those rows' output. The engine orders a batch so that these rows are contiguous, so both paths read
views of the same K/V. Rows without an intervention are never touched, so with no
intervention the output is stock SDPA generation, token for token.

Per-request state lives in :class:`ForwardContext`, which the engine activates around one forward or one
``generate`` call; nothing is stored on the model between requests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from seeright.interventions.adapters.base import StopForward
from seeright.interventions.lora import Lora, LoraStacks, lora_hooks, row_modules
from seeright.interventions.methods.base import Hooks, acting_order
from seeright.interventions.thread_hooks import this_thread_only

if TYPE_CHECKING:
    from seeright.interventions.adapters.base import ModelAdapter
    from seeright.interventions.methods.base import RowState

ATTENTION_NAME = "seeright"
RUNTIME_ATTR = "_seeright_runtime"


class StateBatch(list):
    """The states one hooks call covers, in row order. ``cache`` keeps what hooks derive from them (stacked
    parameters, masks) for the rest of the call, so decode steps do not rebuild it."""

    def __init__(self, states: Sequence[RowState] = ()) -> None:
        super().__init__(states)
        self.cache: dict[str, Any] = {}


@dataclass
class Group:
    """Rows that share one hooks object: ``rows`` indexes the tensor the hook receives."""

    hooks: Hooks
    rows: torch.Tensor
    states: StateBatch
    whole: bool = False  # ``rows`` is every row of that tensor, in order


@dataclass
class ProbsPlan:
    """Rows whose probabilities a layer needs: their batch indices, first needed query rows, and groups
    (``Group.rows`` indexing into these rows)."""

    rows: torch.Tensor
    starts: torch.Tensor
    q0: int
    groups: list[Group]
    write: torch.Tensor  # [n] bool: rows that some state edits (others are only read)
    any_write: bool
    full_write: bool  # every row of the plan is edited from q0 on
    span: tuple[int, int] | None  # the plan's rows as a contiguous batch range (views, no gathering)


@dataclass
class ForwardContext:
    """Per-row states for one batched forward or generation; ``rows[b]`` holds row b's states and ``loras[b]``
    (when given) its LoRA adapter.

    What hooks want may depend on the layer and on whether the step is the prefill (step 0), nothing
    else; plans are therefore computed once per layer for the prefill and once for all decode steps.
    """

    rows: Sequence[Sequence[RowState]]
    stop_after_layer: int | None = None
    step: int = -1
    image_counts: Sequence[int] | None = None  # images per row, in the order the vision tower sees them (prefills)
    loras: Sequence[Lora | None] = ()
    _members: dict[int, tuple[Hooks, list[int], list[RowState]]] = field(default_factory=dict, init=False)
    _plans: dict[tuple, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        members: dict[int, tuple[Hooks, list[int], list[RowState]]] = {}
        for b, states in enumerate(self.rows):
            for state in states:
                hooks, rows, row_states = members.setdefault(id(state.hooks), (state.hooks, [], []))
                rows.append(b)
                row_states.append(state)
        # hooks act in the registry's order in every layer, never in the order the batch's rows bring them
        self._members = dict(sorted(members.items(), key=lambda item: acting_order(item[1][0])))

    @property
    def idle(self) -> bool:
        """No row has a method or an adapter: the forward needs no hook (stock generation)."""
        return not any(self.rows) and not any(lora is not None for lora in self.loras) and self.stop_after_layer is None

    def vision_masks(self) -> dict[str, torch.Tensor]:
        """Per mask target, ``[images of the batch, layers, tokens]``: the rows' :meth:`Hooks.vision_mask` of that
        target, all True for the images of rows that mask nothing there; empty when no row masks (or the forward
        sees no images)."""
        if self.image_counts is None:
            return {}
        masks = [next((m for s in states if (m := s.hooks.vision_mask(s)) is not None), None) for states in self.rows]
        out = {}
        for target in sorted({m.target for m in masks if m is not None}):
            shape = next(m.keep.shape[1:] for m in masks if m is not None and m.target == target)
            out[target] = torch.cat([m.keep if m is not None and m.target == target else torch.ones((n, *shape), dtype=torch.bool)
                                     for m, n in zip(masks, self.image_counts) if n])
        return out

    def groups(self, wanted: str, layer: int, device: torch.device) -> list[Group]:
        """Groups whose hooks want ``wanted`` ("heads" or "hidden") in this layer at this step."""
        key = (wanted, layer, self.step == 0)
        if key not in self._plans:
            out = []
            for hooks, rows, states in self._members.values():
                keep = [i for i, s in enumerate(states) if hooks.wants(wanted, s, layer, self.step)]
                if keep:
                    idx = torch.tensor([rows[i] for i in keep], device=device)
                    out.append(Group(hooks, idx, StateBatch(states[i] for i in keep)))
            self._plans[key] = out
        return self._plans[key]

    def probs_plan(self, layer: int, device: torch.device) -> ProbsPlan | None:
        """The rows needing probabilities in this layer (``None`` when no row does)."""
        key = ("probs", layer, self.step == 0)
        if key not in self._plans:
            starts: dict[int, int] = {}
            writes: set[int] = set()
            asked = []
            for hooks, rows, states in self._members.values():
                chosen = []
                for b, state in zip(rows, states):
                    start = hooks.probs_from(state, layer, self.step)
                    if start is not None:
                        starts[b] = min(start, starts.get(b, start))
                        chosen.append((b, state))
                        if not hooks.reads_only(state, layer, self.step):
                            writes.add(b)
                if chosen:
                    asked.append((hooks, chosen))
            plan = None
            if starts:
                order = sorted(starts)
                position = {b: i for i, b in enumerate(order)}
                groups = [
                    Group(
                        hooks, torch.tensor([position[b] for b, _ in chosen], device=device), StateBatch(s for _, s in chosen),
                        whole=[position[b] for b, _ in chosen] == list(range(len(order))),
                    )
                    for hooks, chosen in asked
                ]
                plan = ProbsPlan(
                    rows=torch.tensor(order, device=device),
                    starts=torch.tensor([starts[b] for b in order], device=device),
                    q0=min(starts.values()),
                    groups=groups,
                    write=torch.tensor([b in writes for b in order], device=device),
                    any_write=bool(writes),
                    full_write=len(writes) == len(order) and len(set(starts.values())) == 1,
                    span=(order[0], order[-1] + 1) if order == list(range(order[0], order[-1] + 1)) else None,
                )
            self._plans[key] = plan
        return self._plans[key]


class Runtime:
    """Hooks installed once on a model; ``activate`` binds a :class:`ForwardContext` for a call."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self._local = threading.local()  # the context of each thread's forward (see ``activate``)
        info = adapter.info
        self.num_heads, self.head_dim = info.num_heads, info.head_dim
        register_attention()
        model.set_attn_implementation({"text_config": ATTENTION_NAME})
        for layer in adapter.decoder_layers:
            setattr(layer.self_attn, RUNTIME_ATTR, self)
        self.lora_modules = row_modules(model, adapter.language_model)
        self.lora_stacks = LoraStacks()
        self.progress_hooks: OrderedDict[int, Callable[[str], None]] = OrderedDict()

    def register_progress_hook(self, hook: Callable[[str], None]) -> RemovableHandle:
        """Call ``hook(where)`` at the points :meth:`reached` names: in every decoder layer's attention function at
        its start (``"text attention start"``) and, where it recomputes rows with the methods' edits, after their
        scores and probabilities (``"text attention scores"``, ``"... probs"``); between an admission's stages
        (``"admission ..."``). In every thread (a hook that should act in one thread checks, as
        :func:`this_thread_only` does), until the handle is removed."""
        handle = RemovableHandle(self.progress_hooks)
        self.progress_hooks[handle.id] = hook
        return handle

    def reached(self, where: str) -> None:
        """Run the progress hooks at ``where``."""
        for hook in tuple(self.progress_hooks.values()):
            hook(where)

    @property
    def context(self) -> ForwardContext | None:
        """The context bound by this thread's ``activate`` (``None`` outside one)."""
        return getattr(self._local, "context", None)

    @contextmanager
    def activate(self, context: ForwardContext) -> Iterator[ForwardContext]:
        """Bind ``context`` and install the hooks it needs (only those) until the call ends. The binding and
        the hooks belong to the calling thread: a forward of another thread (a decode step run while this
        thread's admission is paused, :mod:`seeright.service.slicing`) neither sees nor triggers them."""
        if self.context is not None:
            raise RuntimeError("this thread's runtime is already serving another forward; calls must be serialised")
        hooks = {type(h) for h, _, _ in context._members.values()}
        handles = [self.adapter.language_model.register_forward_pre_hook(this_thread_only(self._count_step))]
        layers = self.adapter.decoder_layers
        if any(h.wants_heads is not Hooks.wants_heads for h in hooks):
            handles += [layer.self_attn.o_proj.register_forward_pre_hook(this_thread_only(self._make_o_proj_hook(i)))
                        for i, layer in enumerate(layers)]
        if any(h.wants_hidden is not Hooks.wants_hidden for h in hooks):
            handles += [layer.register_forward_pre_hook(this_thread_only(self._make_hidden_hook(i)), with_kwargs=True)
                        for i, layer in enumerate(layers)]
        if context.stop_after_layer is not None:
            handles.append(layers[context.stop_after_layer].register_forward_hook(this_thread_only(self._stop)))
        for target, keep in context.vision_masks().items():
            handles += self.adapter.mask_vision_attention(keep, target)
        handles += lora_hooks(self.lora_modules, context.loras, self.lora_stacks)
        self._local.context = context
        try:
            yield context
        finally:
            self._local.context = None
            for handle in handles:
                handle.remove()

    # ---- hooks -----------------------------------------------------------------------------------
    def _count_step(self, module: nn.Module, args: Any) -> None:
        context = self.context
        if context is not None:
            context.step += 1

    def _make_hidden_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            context = self.context
            if context is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            for g in context.groups("hidden", layer, hidden.device):
                g.hooks.observe_hidden(layer, hidden.index_select(0, g.rows), g.states, context.step)
            return None

        return hook

    @staticmethod
    def _stop(module: nn.Module, args: Any, output: Any) -> None:
        raise StopForward

    def _make_o_proj_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            context = self.context
            if context is None:
                return None
            x = args[0]
            groups = context.groups("heads", layer, x.device)
            if not groups:
                return None
            heads = x.view(*x.shape[:-1], self.num_heads, self.head_dim)
            for g in groups:
                edited = g.hooks.edit_heads(layer, heads.index_select(0, g.rows), g.states, context.step)
                heads = heads.index_copy(0, g.rows, edited)
            return (heads.reshape(x.shape), *args[1:])

        return hook


def register_attention() -> None:
    """Register the attention function and its mask builder under ``ATTENTION_NAME`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, seeright_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def keep_mask(
    attention_mask: torch.Tensor | None, rows: torch.Tensor, q0: int, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean keep-mask ``[n, 1, q_len - q0, kv_len]`` for the selected rows and query rows ``q0:``;
    ``None`` when every key is visible (a decode step without padding)."""
    if attention_mask is None:  # SDPA skipped the mask: plain causal, queries are the last q_len positions
        if q0 == q_len - 1:
            return None
        q_pos = torch.arange(kv_len - q_len + q0, kv_len, device=device)
        keep = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]
        return keep[None, None].expand(len(rows), 1, -1, -1)
    mask = attention_mask
    if mask.shape[0] == 1:
        mask = mask.expand(int(rows.max()) + 1, *mask.shape[1:])
    mask = mask.index_select(0, rows)[:, :, q0:, :kv_len]
    return mask if mask.dtype == torch.bool else mask == 0


def eager_scores(query: torch.Tensor, key: torch.Tensor, keep: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Pre-softmax attention in float32, ``QK^T * scaling + mask`` (eager attention's math; masked keys at
    the float32 minimum), ``[n, H, q, T]``. ``key`` ``[n, H_kv, T, d]`` has a head per group of ``H / H_kv``
    consecutive query heads (grouped-query attention; ``H_kv = H`` without it): each group's queries meet their
    key head in one product, and the keys are never repeated per query head."""
    n, heads, q, d = query.shape
    kv, total = key.shape[1], key.shape[2]
    grouped = query.reshape(n * kv, heads // kv * q, d)  # (batched products of 3-d views: no broadcast)
    scores = torch.bmm(grouped, key.reshape(n * kv, total, d).transpose(1, 2)).view(n, heads, q, total)
    scores = (scores if scores.dtype == torch.float32 else scores.float()) * scaling
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(torch.float32).min)
    return scores


def edited_attention(
    groups: list[Group], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None,
    keep: torch.Tensor | None, scaling: float, layer: int, step: int, q0: int,
    reached: Callable[[str], None] | None = None,
) -> torch.Tensor | None:
    """Attention with the methods' edits, for query rows ``q0:``: scores, each group's ``edit_scores``, softmax,
    each group's ``edit_probs``, then the weighted values ``[n, q - q0, H, d]`` (None without ``value``: rows
    that are only read). ``query`` ``[n, H, q - q0, d]``, ``key``/``value`` ``[n, H_kv, T, d]`` (grouped as in
    :func:`eager_scores`). Both engines' runtimes call it (:mod:`seeright.service.vllm.worker`); ``reached`` is called
    after the scores and after the probabilities (``"scores"``, ``"probs"``)."""
    scores = _edit(groups, "edit_scores", eager_scores(query, key, keep, scaling), layer, step, q0)
    if reached is not None:
        reached("scores")
    probs = _edit(groups, "edit_probs", torch.softmax(scores, dim=-1), layer, step, q0)
    if reached is not None:
        reached("probs")
    if value is None:
        return None
    n, heads, q, total = probs.shape
    kv = value.shape[1]
    grouped = (probs if probs.dtype == value.dtype else probs.to(value.dtype)).reshape(n * kv, heads // kv * q, total)
    return torch.bmm(grouped, value.reshape(n * kv, total, -1)).view(n, heads, q, -1).transpose(1, 2)


def _edit(groups: list[Group], what: str, tensor: torch.Tensor, layer: int, step: int, q0: int) -> torch.Tensor:
    """Each group's ``edit_scores`` or ``edit_probs`` on its rows of ``tensor``, in the groups' order (groups
    whose hooks do not override it are skipped)."""
    for g in groups:
        if getattr(type(g.hooks), what) is getattr(Hooks, what):
            continue
        edit = getattr(g.hooks, what)
        if g.whole:
            tensor = edit(layer, tensor, g.states, step, q0)
        else:
            tensor = tensor.index_copy(0, g.rows, edit(layer, tensor.index_select(0, g.rows), g.states, step, q0))
    return tensor


def _attention_progress(runtime: Runtime) -> Callable[[str], None]:
    """``reached(stage)`` for the attention function: the runtime's progress hooks at ``"text attention {stage}"``."""
    return lambda stage: runtime.reached(f"text attention {stage}")


def _sdpa_rows(module, query, key, value, attention_mask, lo, hi, **kwargs):
    """SDPA on batch rows ``lo:hi`` (views, no copies)."""
    mask = attention_mask
    if mask is not None and mask.shape[0] != 1:
        mask = mask[lo:hi]
    return sdpa_attention_forward(module, query[lo:hi], key[lo:hi], value[lo:hi], mask, **kwargs)[0]


def seeright_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA for the rows that need no probabilities; eager + method edits for the query rows that do.

    When the rows needing probabilities form a contiguous range of the batch (the engine orders rows so
    that they do), both paths work on views of the same K/V: nothing is copied and nothing computed
    twice. Otherwise SDPA runs for the whole batch and those rows are gathered and recomputed.
    """
    runtime: Runtime | None = getattr(module, RUNTIME_ATTR, None)
    reached = _attention_progress(runtime) if runtime is not None and runtime.progress_hooks else None
    if reached is not None:
        reached("start")
    ctx = runtime.context if runtime is not None else None
    plan = ctx.probs_plan(module.layer_idx, query.device) if ctx is not None else None
    kw = dict(dropout=dropout, scaling=scaling, **kwargs)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)[0], None
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    layer, device, q0 = module.layer_idx, query.device, plan.q0
    if plan.span is not None:
        lo, hi = plan.span
        pick = lambda t: t[lo:hi]  # noqa: E731
        # the plan's own rows need SDPA only for query rows before q0 or rows that are only read
        own = None if plan.full_write and q0 == 0 else _sdpa_rows(module, query, key, value, attention_mask, lo, hi, **kw)
        parts = [
            _sdpa_rows(module, query, key, value, attention_mask, a, b, **kw) if a < b else None
            for a, b in ((0, lo), (hi, batch))
        ]
    else:
        pick = lambda t: t.index_select(0, plan.rows)  # noqa: E731
        whole = sdpa_attention_forward(module, query, key, value, attention_mask, **kw)[0]
        own = whole.index_select(0, plan.rows)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    keep = keep_mask(attention_mask, plan.rows, q0, q_len, kv_len, device)
    values = pick(value) if plan.any_write else None
    new = edited_attention(plan.groups, pick(query)[:, :, q0:], pick(key), values, keep, scaling, layer, ctx.step,
                           q0, reached)  # [n, q', H, d]
    if new is not None:
        if own is None:
            own = new.contiguous()
        else:
            write = (torch.arange(q0, q_len, device=device)[None, :] >= plan.starts[:, None]) & plan.write[:, None]
            own[:, q0:] = torch.where(write[:, :, None, None], new.to(own.dtype), own[:, q0:])
    if plan.span is not None:
        return torch.cat([p for p in (parts[0], own, parts[1]) if p is not None]), None
    whole[plan.rows] = own
    return whole, None
