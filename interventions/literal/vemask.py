"""Test-only: VE masking's uncertainty map and token choice as the loops of ``seeright.interventions.literal.loops``.

Never on a serving path; the tests and ``seeright bench``'s literal timings use it."""

from __future__ import annotations

import torch

from seeright.interventions.literal import loops as ref
from seeright.interventions.methods.vemask import VEMask
from seeright.interventions.spec import VEMaskParams


class LiteralVEMask(VEMask):
    @staticmethod
    def uncertainty(clean: dict[int, torch.Tensor], attacked: dict[int, torch.Tensor], p: VEMaskParams) -> torch.Tensor:
        layers = p.deviation_layers
        return torch.tensor([
            ref.vemask_uncertainty([clean[l][i] for l in layers], [attacked[l][i] for l in layers])
            for i in range(clean[layers[0]].shape[0])
        ], dtype=torch.float64)

    @staticmethod
    def select(uncertainty: torch.Tensor, p: VEMaskParams) -> torch.Tensor:
        masked = torch.zeros(uncertainty.shape, dtype=torch.bool)
        for i, row in enumerate(uncertainty.tolist()):
            masked[i, ref.vemask_select(row, p.threshold, p.mask_ratio, p.include_cls)] = True
        return masked
