"""Test-only: AGSER's attention contributions as explicit loops over heads and positions (the paper's sum over
heads, then the mean over layers), and its consistency as the textbook LCS recursion table.

Never on a serving path; ``seeright bench``'s literal timings use it."""

from __future__ import annotations

import torch

from seeright.interventions.methods.agser import AGSER
from seeright.interventions.methods.base import RowState


class LiteralAGSER(AGSER):
    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        for r, state in enumerate(states):
            if "hide" in state.data:
                continue
            row = probs[r, :, -1]  # [H, T]
            start, end = state.layout.query_span
            query = torch.tensor([sum(float(row[h, j]) for h in range(row.shape[0])) for j in range(start, end)],
                                 dtype=probs.dtype)
            image = torch.tensor([sum(float(row[h, j]) for h in range(row.shape[0])) for j in state.layout.image_positions.tolist()],
                                 dtype=probs.dtype)
            self.record(state, layer, query, image)
        return probs
