"""Test-only: PAINT's token selection and boost as the loops of ``seeright.interventions.literal.loops``.

Never on a serving path; the tests and ``seeright bench``'s literal timings use it."""

from __future__ import annotations

import torch

from seeright.interventions.literal import loops as ref
from seeright.interventions.literal.pai import LiteralPAI
from seeright.interventions.methods.base import Passes, RowState
from seeright.interventions.methods.paint import PAINT


class LiteralPAINT(PAINT):
    contrast = LiteralPAI.contrast

    def prepare(self, states: list[RowState], passes: Passes) -> None:
        for state in states:
            first, feature = passes.cls_attention(state.request.prompt.images)
            picks = [ref.paint_select(f.tolist(), g.tolist(), state.params.local_token_ratio, state.params.summary_iqr)
                     for f, g in zip(first, feature)]
            state.data["positions"] = [
                ([start + j for j in local], [start + j for j in summary])
                for (start, _), (local, summary) in zip(state.request.prompt.layout.image_spans, picks)
            ]

    def edit_scores(self, layer: int, scores: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        out = scores.clone()
        for row, state in enumerate(states):
            shift = state.layout.pad - state.request.prompt.layout.pad
            local = [p + shift for picks in state.data["positions"] for p in picks[0]]
            summary = [p + shift for picks in state.data["positions"] for p in picks[1]]
            out[row] = ref.paint_boost(scores[row], local, summary, state.params.alpha, state.params.beta).to(scores.dtype)
        return out
