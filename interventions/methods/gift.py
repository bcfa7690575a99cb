"""GIFT: gaze-shift-guided cross-modal fusion (arXiv 2510.22067; release ``amazon-science/GIFT``).

Saliency (from the vanilla model's prefill of the same prompt): for query rows
i, the gaze shift is ``G_i = max(A_i - A_{i-1}, 0)`` over image columns (post-softmax A; the first query
row is compared with the token before the query). Rows are restricted to content words; per layer the
top ``head_fraction`` heads by ``sum G`` are kept; ``s`` is the mean over (layers, heads, rows), clipped
to ``mean +- clip_sigma * std``, min-max scaled to ``[0, alpha]`` and ``Sal = exp(s)``.

Enhancement (each ``enhance_layers`` layer, every forward, last query row only): with ``A_v`` / ``A_q``
the row's attention on image / query tokens, ``H_v`` and ``H_q`` the top heads by ``sum A_v`` and
``sum A_q``, ``r = sum_{H_v} A_v * Sal / sum_{H_v} A_v``; then ``A_v[H_v] *= Sal``, ``A_q[H_q] *= r`` and
the row is renormalised to sum 1.

The release runs an extra prefill for the saliency. When every saliency layer precedes every enhanced
layer and nothing else edits the request's forward, the generation's own prefill is that vanilla pass
up to those layers, so the gaze rows are read there (``saliency_pass="auto"``) and the map is finished
before the first enhanced layer; otherwise one prefill stopped after the last saliency layer runs first.

Cost: no extra pass in the fused case, else one partial prefill; then the last row in the enhanced
layers (per decode token: ``seeright bench``'s record in docs/performance.md).

Flat map: when ``s`` is constant after clipping (no gaze shift anywhere, or all equal), the min-max scaling is
undefined (the release divides by zero); the map is then flat, ``Sal = 1``, and the enhancement leaves the
image columns as they are. ``diagnostics["flat_saliency"]`` says so.

Content words: a closed-class rule instead of spaCy (``interventions/content_words.py``); when a query
has none, every query row is used (the release would take a mean over nothing and produce NaN).
"""

from __future__ import annotations

import torch

from seeright.interventions.adapters.base import ModelInfo
from seeright.interventions.layout import TokenLayout
from seeright.interventions.methods.base import (
    HookPoint, Hooks, Method, Passes, RowState, cached, check_layers, last_query_row, over_keys, per_row, row_masks,
)
from seeright.interventions.spec import GIFTParams


def head_counts(fraction: torch.Tensor, heads: int) -> torch.Tensor:
    """Each row's number of top heads, ``max(1, int(H * fraction))``, ``[n, 1]``."""
    return (fraction * heads).floor().clamp_min(1)[:, None]


def top_heads(mass: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean ``[n, H]`` mask of each row's top ``counts`` (:func:`head_counts`) heads by ``mass`` ``[n, H]``."""
    return mass.argsort(-1, descending=True).argsort(-1) < counts


def saliency_map(gaze: list[torch.Tensor], content_rows: list[int], params: GIFTParams) -> torch.Tensor:
    """``Sal`` over image tokens from per-layer attention ``[H, Nq + 1, Nv]`` (rows q_start - 1 .. q_end - 1)."""
    per_layer = []
    for attn in gaze:
        shift = (attn[:, 1:] - attn[:, :-1]).clamp_min(0)
        if content_rows:
            shift = shift[:, content_rows]
        counts = head_counts(torch.tensor([params.head_fraction], device=shift.device), shift.shape[0])
        heads = top_heads(shift.sum((1, 2))[None], counts)[0]
        per_layer.append(shift[heads])
    s = torch.stack(per_layer).mean((0, 1, 2))
    mean, std = s.mean(), s.std()
    s = s.clamp(mean - params.clip_sigma * std, mean + params.clip_sigma * std)
    span = s.max() - s.min()
    s = (s - s.min()) / span * params.alpha if span > 0 else torch.zeros_like(s)
    return s.exp()


class GIFT(Method):
    name = "gift"
    params_model = GIFTParams
    hook_points = frozenset({HookPoint.ANALYSIS, HookPoint.PROBS})
    order = 20
    literal = "seeright.interventions.literal.gift:LiteralGIFT"
    sweep = ({"alpha": 1.0},)

    def defaults(self, info: ModelInfo) -> dict:
        depth = info.num_layers  # the LLaVA-1.5-7B release config (11; 12..22 of 32) scaled to the depth
        return {
            "saliency_layers": [round(11 * depth / 32)],
            "enhance_layers": list(range(round(12 * depth / 32), round(22 * depth / 32) + 1)),
        }

    def check(self, params: GIFTParams, info: ModelInfo) -> GIFTParams:
        depth = info.num_layers
        return params.model_copy(
            update={
                "saliency_layers": check_layers("gift.saliency_layers", params.saliency_layers, depth),
                "enhance_layers": check_layers("gift.enhance_layers", params.enhance_layers, depth),
            }
        )

    def prepare(self, states: list[RowState], passes: Passes) -> None:
        separate = []
        for state in states:
            state.data["fused"] = self._can_fuse(state)
            if not state.data["fused"]:
                separate.append(state)
        if not separate:
            return
        capture = _GazeCapture()
        rows = [[RowState(hooks=capture, params=s.params, request=s.request)] for s in separate]
        stop = max(s.params.saliency_layers[-1] for s in separate)
        passes.prefill([s.request.prompt for s in separate], rows, stop_after_layer=stop)
        for state, row in zip(separate, rows):
            state.data["gaze"] = row[0].data["gaze"]
            self._finish_saliency(state, row[0].layout)

    @staticmethod
    def _can_fuse(state: RowState) -> bool:
        """The generation's own prefill equals the vanilla saliency pass up to the saliency layers."""
        p = state.params
        return p.saliency_pass == "auto" and not state.companions and p.saliency_layers[-1] < p.enhance_layers[0]

    @staticmethod
    def _finish_saliency(state: RowState, layout: TokenLayout) -> None:
        content = [] if state.params.content_words == "all" else [p - layout.query_span[0] for p in layout.content_positions]
        gaze = [state.data["gaze"].pop(layer) for layer in state.params.saliency_layers]
        state.data["saliency"] = saliency_map(gaze, content, state.params)
        state.diagnostics["saliency"] = state.data["saliency"]
        state.diagnostics["flat_saliency"] = (state.data["saliency"] == 1).all()  # read at the end, no sync here

    def _capturing(self, state: RowState, layer: int, step: int) -> bool:
        return step == 0 and state.data.get("fused", False) and layer in state.params.saliency_layers

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        if self._capturing(state, layer, step):
            return state.layout.query_span[0] - 1
        if layer not in state.params.enhance_layers:
            return None
        return last_query_row(state, step)

    def reads_only(self, state: RowState, layer: int, step: int) -> bool:
        return self._capturing(state, layer, step)

    def row_causal(self, state: RowState, layer: int) -> bool:
        return self._capturing(state, layer, 0)  # the gaze of the question's rows, each kept as it comes

    def edit_probs(
        self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int
    ) -> torch.Tensor:
        """Rows reading their fused saliency here are only read; the other rows are enhanced. Each row's
        own settings decide which (a batch may mix rows of different saliency and enhanced layers)."""
        capturing = [i for i, s in enumerate(states) if self._capturing(s, layer, step)]
        if not capturing:
            return self._enhance(probs, states, step)
        capture_gaze(layer, probs[capturing], [states[i] for i in capturing], q0)
        taken = set(capturing)
        enhanced = [i for i in range(len(states)) if i not in taken]
        if not enhanced:
            return probs
        out = probs.clone()
        out[enhanced] = self._enhance(probs[enhanced], [states[i] for i in enhanced], step)
        return out

    def _enhance(self, probs: torch.Tensor, states: list[RowState], step: int) -> torch.Tensor:
        """The enhancement of the last query row of ``probs`` ``[n, H, q, T]`` for every row of ``states``."""
        device, total = probs.device, probs.shape[-1]
        if step == 0:
            for state in states:
                if "saliency" not in state.data:
                    self._finish_saliency(state, state.layout)
        row = probs[:, :, -1]  # [n, H, T]
        vis = row_masks(states, total, device, "image")[:, None]
        query = row_masks(states, total, device, "query")[:, None]
        prompt = max(s.layout.length for s in states)
        sal = over_keys(states, "saliency", total, lambda: torch.stack([self._full_saliency(s, prompt, device) for s in states]), 1.0)[:, None]
        counts = cached(states, "head counts", lambda: head_counts(per_row(states, "head_fraction", device), row.shape[1]))

        hv = top_heads((row * vis).sum(-1), counts)[..., None] & vis
        boosted = row * sal
        ratio = (boosted * hv).sum((1, 2)) / (row * hv).sum((1, 2))
        out = torch.where(hv, boosted, row)
        hq = top_heads((row * query).sum(-1), counts)[..., None] & query
        out = torch.where(hq, out * ratio[:, None, None], out)
        out = (out / out.sum(-1, keepdim=True))[:, :, None]
        return out if probs.shape[2] == 1 else torch.cat([probs[:, :, :-1], out], dim=2)

    @staticmethod
    def _full_saliency(state: RowState, total: int, device: torch.device) -> torch.Tensor:
        full = torch.ones(total, device=device)
        full[state.layout.image_positions.to(device)] = state.data["saliency"].to(device)
        return full


def capture_gaze(layer: int, probs: torch.Tensor, states: list[RowState], q0: int) -> None:
    """Keep each row's attention of query rows ``q_start - 1 .. q_end - 1`` to image tokens; ``probs`` holds query
    rows ``q0`` on: all of those, or, in a prompt split in chunks, the ones in this chunk (appended in order)."""
    for row, state in enumerate(states):
        start, end = state.layout.query_span
        lo, hi = max(start - 1, q0), min(end, q0 + probs.shape[2])
        if lo >= hi:
            continue
        attn = probs[row, :, lo - q0 : hi - q0, state.layout.image_positions.to(probs.device)]
        gaze = state.data.setdefault("gaze", {})
        gaze[layer] = attn if lo == start - 1 else torch.cat([gaze[layer], attn], dim=1)


class _GazeCapture(Hooks):
    """The separate saliency pass: records gaze rows in the saliency layers."""

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        if step != 0 or layer not in state.params.saliency_layers:
            return None
        return state.layout.query_span[0] - 1

    def reads_only(self, state: RowState, layer: int, step: int) -> bool:
        return True

    def row_causal(self, state: RowState, layer: int) -> bool:
        return True

    def edit_probs(
        self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int
    ) -> torch.Tensor:
        capture_gaze(layer, probs, states, q0)
        return probs
