"""Test-only: Lookback Lens ratios as the loop of ``seeright.interventions.literal.loops`` (kept as the fast path keeps them).

Never on a serving path; ``seeright bench``'s literal timings use it."""

from __future__ import annotations

import torch

from seeright.interventions.literal import loops as ref
from seeright.interventions.methods.base import RowState
from seeright.interventions.methods.lookback import Lookback


class LiteralLookback(Lookback):
    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        for r, state in enumerate(states):
            ratios = ref.lookback_ratios(probs[r, :, -1], state.layout.image_positions.tolist(), state.layout.length)
            self.record(state, layer, torch.tensor(ratios, dtype=probs.dtype))
        return probs
