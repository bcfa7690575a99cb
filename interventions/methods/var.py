"""VAR: visual attention sink redistribution (Kang et al., ICLR 2025, "See What You Are Told").

Step A (prefill, each edited layer l; sink masks are kept over the row's own tokens, without padding, so a
row keeps them when a batch re-pads it): with ``x`` the residual stream entering layer l and
``x̂ = x / sqrt(mean(x²) + 1e-6)``, token j is a sink when ``max_{d in D_sink} |x̂_j[d]| > tau``
(strict, as the release). Visual sinks are sinks among image tokens; text sinks are the others.

Step B (every forward, per head h and query row i, post-softmax A): the head is image-centric when
``sum_{vis} A >= min_image_attention`` and its visual sink fraction
``sum_{vis sinks} A / sum_{vis} (A + 1e-6) <= 1 - rho`` (paper: non-sink ratio >= rho). No visual sink in
the layer: nothing is selected.

Guard (not in the paper or the release): a head whose row has no attention on visual non-sink tokens (every
image token is a sink) is not selected, since the budget would have nowhere to go (the release divides by
zero there). ``diagnostics["all_visual_sinks"][layer]`` says where that happened.

Step C: for selected (h, i), sinks (visual and text) keep ``1 - p`` of their attention and the budget
``p * sum_{sinks} A`` is spread over visual non-sink tokens in proportion to their attention. Rows still
sum to 1. Prefill edits only the text rows after the image; decode edits the new row. Sink sets come
from the prefill and are reused at decode. The last layer is not edited (paper; the release's exclusion
never fires).

Cost: attention probabilities only for the edited query rows (one per sequence at decode); every sum the
selection and the budget need comes from one matmul of those rows with per-request key masks; the edit is
one multiplicative factor (per decode token: ``seeright bench``'s record in docs/performance.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seeright.interventions.adapters.base import ModelInfo
from seeright.interventions.methods.base import HookPoint, Method, RowState, cached, check_layers, over_keys, per_row
from seeright.interventions.spec import VARParams


class VAR(Method):
    name = "var"
    params_model = VARParams
    hook_points = frozenset({HookPoint.HIDDEN, HookPoint.PROBS})
    order = 10
    literal = "seeright.interventions.literal.var:LiteralVAR"
    sweep = ({"tau": 3.0},)

    def defaults(self, info: ModelInfo) -> dict:
        return {"layers": list(range(2, info.num_layers - 1))}  # paper: layers >= 2, the last one excluded

    def check(self, params: VARParams, info: ModelInfo) -> VARParams:
        if params.sink_dims is None:
            raise ValueError("sink_dims: this model has no known sink dimensions; pass var.sink_dims")
        bad = [d for d in params.sink_dims if not 0 <= d < info.hidden_size]
        if bad or not params.sink_dims:
            raise ValueError(f"sink_dims: {bad or 'empty'} not valid for hidden size {info.hidden_size}")
        return params.model_copy(update={"layers": check_layers("var.layers", params.layers, info.num_layers)})

    # Step A -------------------------------------------------------------------------------------------
    def wants_hidden(self, state: RowState, layer: int, step: int) -> bool:
        return step == 0 and layer in state.params.layers

    def row_causal(self, state: RowState, layer: int) -> bool:
        return True  # a key's sink flag is its own residual stream's; a row's edit reads the keys up to it

    def observe_hidden(self, layer: int, hidden: torch.Tensor, states: list[RowState], step: int) -> None:
        """The sinks among the prompt's rows seen: all of them, or, in a prompt split in chunks, those so far (each
        row's flag is its own: the rows flagged before are not read again); the diagnostics once every row is."""
        for row, state in enumerate(states):
            pad, length = state.layout.pad, state.layout.length
            seen = state.data.setdefault("sinks", {}).get(layer)
            x = hidden[row, pad + (0 if seen is None else len(seen)) : length].float()
            phi = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))[:, state.params.sink_dims].abs().amax(-1)
            sinks = phi > state.params.tau if seen is None else torch.cat([seen, phi > state.params.tau])
            state.data["sinks"][layer] = sinks  # kept without padding: batches re-pad rows
            if len(sinks) < length - pad:
                continue
            vis = state.layout.image_mask(length)[pad:].to(sinks.device)
            state.diagnostics.setdefault("visual_sinks", {})[layer] = (sinks & vis).sum()
            state.diagnostics.setdefault("sink_tokens", {})[layer] = sinks[vis].nonzero().flatten()  # among image tokens
            state.diagnostics.setdefault("text_sinks", {})[layer] = (sinks & ~vis).sum()
            state.diagnostics.setdefault("all_visual_sinks", {})[layer] = (vis & ~sinks).sum() == 0

    # Steps B and C ------------------------------------------------------------------------------------
    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        if layer not in state.params.layers:
            return None
        return state.layout.image_end if step == 0 else 0

    def edit_probs(
        self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int
    ) -> torch.Tensor:
        n, _, q, total = probs.shape
        device = probs.device
        if step == 0:
            _drop_stale(states, layer)
        # One matmul of the rows with per-request columns over keys gives every sum the tests and the budget
        # need (_columns); the three tests are then one comparison with per-row bounds (_bounds).
        columns = over_keys(states, "columns", total, lambda: _columns(states, layer, device), 0.0)
        rows = probs.flatten(1, 2)  # [n, H * q, total]: one batched matmul, no broadcast
        sums = torch.bmm(rows, columns)  # [n, H * q, 4]
        selected = (sums > cached(states, "bounds", lambda: _bounds(states, layer, device))).all(-1)  # [n, H * q]
        if step == 0:  # prefill: only the text rows after the image
            queries = torch.arange(q0, q0 + q, device=device)
            ends = torch.tensor([s.layout.image_end for s in states], device=device)
            selected = selected.view(n, -1, q) & (queries[None, :] >= ends[:, None])[:, None, :]
            selected = selected.flatten(1)

        # Sinks keep (1 - p); visual non-sinks gain budget * A_j / free_sum, i.e. A_j * (1 + c).
        keep = over_keys(states, "keep", total, lambda: 1 - columns[..., 0], 1.0)[:, None]
        c = sums[..., :1] / sums[..., 3:]  # p * sum_sinks A / sum_free A (unselected rows: never read)
        factor = torch.addcmul(keep, c, columns[:, None, :, 3])
        counts = cached(states, "selected", lambda: self._counters(states, layer, device))
        counts += selected.sum(1)  # stays on the device: no sync per step
        return (rows * torch.where(selected[..., None], factor, 1.0)).view(probs.shape)

    @staticmethod
    def _counters(states: list[RowState], layer: int, device: torch.device) -> torch.Tensor:
        """One counter per row of selected (head, query row) pairs; each state's diagnostics hold a view,
        so ``diagnostics["selected"][layer]`` reads ``[prefill count, decode count]``."""
        counts = torch.zeros(len(states), dtype=torch.long, device=device)
        for row, state in enumerate(states):
            state.diagnostics.setdefault("selected", {}).setdefault(layer, []).append(counts[row])
        return counts


def _masks(states: list[RowState], layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinks and image tokens ``[n, prompt]`` over the padded prompt (rows not seen yet: no sinks)."""
    prompt = max(s.layout.length for s in states)
    sinks = [s.data["sinks"][layer] for s in states]
    sink = torch.stack([F.pad(k, (s.layout.pad, prompt - s.layout.pad - len(k))) for s, k in zip(states, sinks)]).to(device)
    return sink, torch.stack([s.layout.image_mask(prompt) for s in states]).to(device)


def _columns(states: list[RowState], layer: int, device: torch.device) -> torch.Tensor:
    """``[n, prompt, 4]`` over keys: ``p`` on sinks (visual or text); 1 on image tokens; ``1 - rho`` on image tokens
    less 1 on visual sinks; 1 on visual non-sinks. A row of attention times them sums to the budget
    ``p * sum_sinks A``, ``sum_vis A``, ``(1 - rho) sum_vis A - sum_vis_sinks A`` and ``free_sum``."""
    sink, vis = _masks(states, layer, device)
    p, rho = (per_row(states, name, device)[:, None] for name in ("p", "rho"))
    return torch.stack([p * sink, vis.float(), (1 - rho) * vis - (vis & sink).float(), (vis & ~sink).float()], dim=-1)


def _bounds(states: list[RowState], layer: int, device: torch.device) -> torch.Tensor:
    """``[n, 1, 4]``: a (head, row) is selected where every sum of :func:`_columns` exceeds its bound. Step B:
    the head is image-centric, ``sum_vis A >= min_image_attention``, and its visual sink fraction is at most
    ``1 - rho``, ``sum_vis_sinks A / sum_vis (A + 1e-6) <= 1 - rho`` (as released), multiplied out:
    ``(1 - rho) sum_vis A - sum_vis_sinks A >= -(1 - rho) 1e-6 |vis|``; the guard, ``free_sum > 0``. Each ``>=``
    is a ``>`` of the next float32 below; a row without a visual sink selects nothing (bound +inf)."""
    sink, vis = _masks(states, layer, device)
    bar = 1 - per_row(states, "rho", device)
    low = per_row(states, "min_image_attention", device)
    image = torch.where(low > 0, low, -math.inf).masked_fill(~(sink & vis).any(-1), math.inf)
    ratio = -bar * (1e-6 * vis.sum(-1))
    below = torch.nextafter(torch.stack([image, ratio], dim=-1), torch.tensor(-math.inf, device=device))
    return torch.cat([torch.full_like(below[:, :1], -math.inf), below, torch.zeros_like(below[:, :1])], -1)[:, None]


def _drop_stale(states: list[RowState], layer: int) -> None:
    """In a prompt split in chunks the sinks grow with the rows seen: what the prefill's call built from fewer rows
    is built again (a whole prompt's prefill sees every row at once)."""
    cache = getattr(states, "cache", None)
    if cache is None:
        return
    seen = sum(len(s.data["sinks"][layer]) for s in states)
    if cache.get("rows seen") != seen:
        for key in ("columns", "keep", "bounds"):
            cache.pop(key, None)
        cache["rows seen"] = seen
