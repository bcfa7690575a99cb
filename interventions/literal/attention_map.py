"""Test-only: the attention map as loops over rows, image tokens and heads (``seeright bench``'s literal timing).

Never on a serving path."""

from __future__ import annotations

import torch

from seeright.interventions.methods.attention_map import AttentionMap
from seeright.interventions.methods.base import RowState


class LiteralAttentionMap(AttentionMap):
    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        heads = probs.shape[1]
        for r, state in enumerate(states):
            values = []
            for start, end in state.layout.image_spans:
                for j in range(start, end):
                    values.append(sum(float(probs[r, h, -1, j]) for h in range(heads)) / heads)
            current = torch.tensor(values, dtype=torch.float32, device=probs.device)
            state.data["sum"] = current if layer == state.params.layers[0] else state.data["sum"] + current
            if layer == state.params.layers[-1]:
                self._finish_token(state, state.data.pop("sum") / len(state.params.layers))
        return probs
