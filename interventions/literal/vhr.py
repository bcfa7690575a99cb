"""Test-only: VHR with head selection and scaling as the loops of ``seeright.interventions.literal.loops``.

Never on a serving path; the tests and ``seeright bench``'s literal timings use it."""

from __future__ import annotations

import torch

from seeright.interventions.literal import loops as ref
from seeright.interventions.methods.base import RowState
from seeright.interventions.methods.vhr import VHR


class LiteralVHR(VHR):
    def edit_heads(self, layer: int, heads: torch.Tensor, states: list[RowState], step: int) -> torch.Tensor:
        out = heads.clone()
        for row, state in enumerate(states):
            if step == 0 and state.params.heads is None:
                chosen, _ = ref.vhr_select(heads[row, -1], state.data["text_heads"][layer], state.params.outlier_filter)
                state.data.setdefault("heads", {})[layer] = chosen
            last_only = step == 0 and state.params.prefill_positions == "last"
            out[row] = ref.vhr_scale(heads[row], state.data["heads"][layer], state.params.alpha, last_only).to(heads.dtype)
        return out
