"""PAI: paying more attention to image (Liu et al., ECCV 2024, §3.2, Eq. 5).

On the pre-softmax attention logits ``z = QK^T / sqrt(d) + mask`` of the **last query row** (the last prompt
token at prefill, the new token at each decode step), all heads, layers ``layers`` (default 2..L-1, the
release's ``[2, 32)`` on 32 layers), the image columns get ``z <- z + alpha * |z|`` (release scripts:
alpha 0.2); the softmax follows. Other query rows and every other column are untouched. Image columns are
the row's image tokens, however many images it has (the release assumes one 576-token image at BOS + the
system text). The release edits a float16 ``z`` after the clamp to ``finfo.min``; here ``z`` is float32.

Cost: attention scores only for the last query row of each sequence in the edited layers (one row per
sequence at decode) and one masked add.
"""

from __future__ import annotations

import torch

from interventions.adapters.base import ModelInfo
from interventions.methods.base import (
    HookPoint, Method, RowState, check_layers, last_query_row, per_row, row_masks,
)
from interventions.spec import PAIParams


class PAI(Method):
    name = "pai"
    params_model = PAIParams
    hook_points = frozenset({HookPoint.SCORES})
    order = 5  # acts on scores, before any method that reads or edits the probabilities of the layer
    literal = "interventions.literal.pai:LiteralPAI"
    sweep = ({"alpha": 0.5},)

    def defaults(self, info: ModelInfo) -> dict:
        return {"layers": list(range(min(2, info.num_layers - 1), info.num_layers))}

    def check(self, params: PAIParams, info: ModelInfo) -> PAIParams:
        return params.model_copy(update={"layers": check_layers("pai.layers", params.layers, info.num_layers)})

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        return last_query_row(state, step) if layer in state.params.layers else None

    def edit_scores(self, layer: int, scores: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        image = row_masks(states, scores.shape[-1], scores.device, "image")  # [n, T]
        alpha = per_row(states, "alpha", scores.device)[:, None]
        last = scores[:, :, -1]  # [n, H, T]: the last query row of every sequence in this forward
        boosted = torch.where(image[:, None, :], last + alpha[:, :, None] * last.abs(), last)
        scores = scores.clone()
        scores[:, :, -1] = boosted
        return scores
