"""Where the model looked: a per-token image-attention map (read-only; ``"diagnostics": true`` on the API).

For generated token t, the attention row that produced it (the last prompt position for the first token, then
the row of token t - 1 fed back), post-softmax and after every method's edit (this hook acts last), restricted to
each image's tokens and averaged over the heads of each layer in ``layers`` and then over those layers:

    M_t[i][r, c] = mean_{l in layers} mean_h A^{l,h}[q_t, s_i + r * cols_i + c]

on image i's token grid ``rows_i x cols_i`` (LLaVA-1.5: 24 x 24 patches; Qwen2-VL: the merged 2 x 2 grid). The
values are attention mass, not renormalised over the image (their sum is the share of attention the image got).
Diagnostics: ``maps`` (one entry per generated token: one ``rows x cols`` grid per image) and ``grids``. Cost:
attention probabilities of one query row per sequence in every read layer, at prefill and each decode step.
"""

from __future__ import annotations

import torch

from seeright.interventions.adapters.base import ModelInfo
from seeright.interventions.methods.base import HookPoint, Method, RowState, check_layers, last_query_row
from seeright.interventions.spec import AttentionMapParams


class AttentionMap(Method):
    name = "attention_map"
    params_model = AttentionMapParams
    hook_points = frozenset({HookPoint.PROBS})
    order = 1001  # reads what every editing method (and Lookback Lens, which only reads) has left
    signal = True
    mixed_traffic = False
    literal = "seeright.interventions.literal.attention_map:LiteralAttentionMap"

    def defaults(self, info: ModelInfo) -> dict:
        return {"layers": list(range(info.num_layers))}

    def check(self, params: AttentionMapParams, info: ModelInfo) -> AttentionMapParams:
        return params.model_copy(update={"layers": check_layers("attention_map.layers", params.layers, info.num_layers)})

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        return last_query_row(state, step) if layer in state.params.layers else None

    def reads_only(self, state: RowState, layer: int, step: int) -> bool:
        return True

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        row = probs[:, :, -1].float().mean(1)  # [n, T]: the producing row, mean over heads
        for r, state in enumerate(states):
            spans = state.layout.image_spans
            current = torch.cat([row[r, s:e] for s, e in spans]) if spans else row.new_zeros(0)
            state.data["sum"] = current if layer == state.params.layers[0] else state.data["sum"] + current
            if layer == state.params.layers[-1]:
                self._finish_token(state, state.data.pop("sum") / len(state.params.layers))
        return probs

    @staticmethod
    def _finish_token(state: RowState, flat: torch.Tensor) -> None:
        grids = state.layout.image_grids
        maps, start = [], 0
        for rows, cols in grids:
            maps.append(flat[start : start + rows * cols].view(rows, cols))
            start += rows * cols
        state.diagnostics.setdefault("maps", []).append(maps)
        state.diagnostics["grids"] = [list(g) for g in grids]
