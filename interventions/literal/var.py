"""Test-only: VAR with steps A-C as the loops of ``seeright.interventions.literal.loops``.

Never on a serving path; the tests and ``seeright bench``'s literal timings use it."""

from __future__ import annotations

import torch

from seeright.interventions.literal import loops as ref
from seeright.interventions.methods.base import RowState
from seeright.interventions.methods.var import VAR


class LiteralVAR(VAR):
    def observe_hidden(self, layer: int, hidden: torch.Tensor, states: list[RowState], step: int) -> None:
        for row, state in enumerate(states):
            sinks = ref.var_sinks(hidden[row], state.params.sink_dims, state.params.tau, state.layout.pad)
            mask = torch.zeros(hidden.shape[1], dtype=torch.bool, device=hidden.device)
            mask[sinks] = True
            state.data.setdefault("sinks", {})[layer] = mask[state.layout.pad :]

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        out = probs.clone()
        for row, state in enumerate(states):
            p = state.params
            sinks = (state.data["sinks"][layer].nonzero().flatten() + state.layout.pad).tolist()
            first = max(state.layout.image_end - q0, 0) if step == 0 else 0
            vis = state.layout.image_positions.tolist()
            out[row] = ref.var_edit(probs[row], sinks, vis, p.rho, p.p, p.min_image_attention, first).to(probs.dtype)
        return out
