"""Test-only: GIFT as the release runs it (separate saliency prefill) with the enhancement as a loop.

Never on a serving path; the tests and ``seeright bench``'s literal timings use it."""

from __future__ import annotations

import torch

from seeright.interventions.literal import loops as ref
from seeright.interventions.methods.base import RowState
from seeright.interventions.methods.gift import GIFT


class LiteralGIFT(GIFT):
    """The release's extra saliency prefill and the enhancement as a loop over heads and tokens."""

    @staticmethod
    def _can_fuse(state: RowState) -> bool:
        return False

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        out = probs.clone()
        for row, state in enumerate(states):
            sal = state.data["saliency"].tolist()
            query = list(range(*state.layout.query_span))
            edited = ref.gift_edit_row(probs[row, :, -1], state.layout.image_positions.tolist(), query, sal, state.params.head_fraction)
            out[row, :, -1] = edited.to(probs.dtype)
        return out
