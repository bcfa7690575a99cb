"""Test-only: RITUAL's contrast as the loop of ``seeright.interventions.literal.loops``.

Never on a serving path; the tests and ``seeright bench``'s literal timings use it."""

from __future__ import annotations

import torch

from seeright.interventions.literal import loops as ref
from seeright.interventions.methods.base import RowState
from seeright.interventions.methods.ritual import RITUAL


class LiteralRITUAL(RITUAL):
    def contrast(self, scores: torch.Tensor, branch: torch.Tensor, state: RowState) -> torch.Tensor:
        return ref.ritual_contrast(scores, branch, state.params.alpha, state.params.beta).to(scores.dtype)
