"""Test-only: PAI's boost and CFG contrast as the loops of ``seeright.interventions.literal.loops``.

Never on a serving path; the tests and ``seeright bench``'s literal timings use it."""

from __future__ import annotations

import torch

from seeright.interventions.literal import loops as ref
from seeright.interventions.methods.base import RowState
from seeright.interventions.methods.pai import PAI


class LiteralPAI(PAI):
    def edit_scores(self, layer: int, scores: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        out = scores.clone()
        for row, state in enumerate(states):
            image = state.layout.image_positions.tolist()
            out[row] = ref.pai_boost(scores[row], image, state.params.alpha).to(scores.dtype)
        return out

    def contrast(self, scores: torch.Tensor, branch: torch.Tensor, state: RowState) -> torch.Tensor:
        p = state.params
        return ref.cfg_contrast(scores, branch, p.gamma, p.cfg_cutoff).to(scores.dtype)
