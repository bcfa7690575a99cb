"""A method that lives outside the package, as a plug-in would: one file, nothing else edited.

``image_gain``: in the chosen layers, the last query row's attention to image tokens is multiplied by
``gain`` and the row renormalised (a post-softmax edit, the simplest member of the PAI family).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from seeright.interventions.adapters.base import ModelInfo
from seeright.interventions.methods.base import (
    HookPoint, Method, RowState, check_layers, last_query_row, per_row, row_masks,
)
from seeright.interventions.spec import MethodParams


class ImageGainParams(MethodParams):
    """Multiply the last row's attention to image tokens by ``gain``, then renormalise."""

    gain: float = Field(1.5, gt=0, le=10)
    layers: list[int] | None = Field(None, description="Edited layers; default the second half.")


class ImageGain(Method):
    name = "image_gain"
    params_model = ImageGainParams
    hook_points = frozenset({HookPoint.PROBS})
    order = 50
    sweep = ({"gain": 3.0},)

    def defaults(self, info: ModelInfo) -> dict[str, Any]:
        return {"layers": list(range(info.num_layers // 2, info.num_layers))}

    def check(self, params: ImageGainParams, info: ModelInfo) -> ImageGainParams:
        return params.model_copy(update={"layers": check_layers("image_gain.layers", params.layers, info.num_layers)})

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        return last_query_row(state, step) if layer in state.params.layers else None

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        row = probs[:, :, -1]
        image = row_masks(states, probs.shape[-1], probs.device, "image")[:, None]
        gain = per_row(states, "gain", probs.device)[:, None, None]
        out = torch.where(image, row * gain, row)
        out = out / out.sum(-1, keepdim=True)
        return torch.cat([probs[:, :, :-1], out[:, :, None]], dim=2)
