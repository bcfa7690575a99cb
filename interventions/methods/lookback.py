"""Lookback Lens signals (Chuang et al., EMNLP 2024, §2; release ``step01_extract_attns.py``), for images.

Reads attention, edits nothing. For each decode step (the forward that takes generated token t and yields
token t + 1), in each layer of ``layers`` and each head h, on the new token's post-softmax row (after every
method's edit: this hook acts last):

    LR_{l,h} = A_img / (A_img + A_new),  A_img = mean_{j in image tokens} A[j],  A_new = mean_{j generated} A[j]

Means, not sums, as the release (576 image tokens would dominate a sum). The release's "context" is the
whole prompt; for a vision-language model the context here is the image tokens only, and the prompt's text
(system, question, template) counts in neither mean. Generated tokens are all tokens generated so far,
the new one included (the release fixes ``context_length`` once, so earlier chunks count as new). The first
generated token comes from the prefill, where nothing was generated yet: ratios start with the second token.

Diagnostics: ``mean_ratio`` (over layers, heads and tokens), ``per_token`` (mean over layers and heads, one
per token from the second), with ``features`` the per-token ``[L, H]`` matrices a Lookback Lens detector
takes (mean over a span of tokens, flattened), and with a detector (``detector_weights``, by default the
model's shipped one) each token's ``hallucination_probability``: the detector on the mean of the last ``window``
tokens' rows (the release's sliding window, 8 by default; ``null`` until a window is full, as the release scores no
earlier token). The release's classifiers are fitted with label 1 = *not* hallucinated, so their sigmoid is
P(factual); seeright's testbed detectors use 1 = hallucinated. ``detector_convention`` says which a detector is
(``factual``: the complement is returned), and weights without it are refused. Cost: attention probabilities of one
row per sequence in every read layer at each decode step.
"""

from __future__ import annotations

import torch

from seeright.interventions.adapters.base import ModelInfo
from seeright.interventions.methods.base import HookPoint, Method, RowState, check_layers, row_masks
from seeright.interventions.spec import LookbackParams


class Lookback(Method):
    name = "lookback"
    params_model = LookbackParams
    hook_points = frozenset({HookPoint.PROBS})
    order = 1000  # reads the probabilities every editing method has left
    signal = True
    literal = "seeright.interventions.literal.lookback:LiteralLookback"

    def defaults(self, info: ModelInfo) -> dict:
        return {"layers": list(range(info.num_layers))}

    def check(self, params: LookbackParams, info: ModelInfo) -> LookbackParams:
        layers = check_layers("lookback.layers", params.layers, info.num_layers)
        if params.detector_weights is not None:
            if len(params.detector_weights) != info.num_layers * info.num_heads:
                raise ValueError(f"detector_weights: {len(params.detector_weights)} values for {info.num_layers} layers x "
                                 f"{info.num_heads} heads ({info.num_layers * info.num_heads})")
            if layers != list(range(info.num_layers)):
                raise ValueError("layers: a detector reads every layer")
            if params.detector_convention is None:
                raise ValueError("detector_convention: say what the detector's positive class is: 'hallucinated' (label "
                                 "1 = hallucinated, seeright's detectors) or 'factual' (label 1 = not hallucinated, the "
                                 "release's classifiers)")
        return params.model_copy(update={"layers": layers})

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        return 0 if step > 0 and layer in state.params.layers else None

    def reads_only(self, state: RowState, layer: int, step: int) -> bool:
        return True

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        ratio = lookback_ratios(probs[:, :, -1], states)  # [n, H]
        for r, state in enumerate(states):
            self.record(state, layer, ratio[r])
        return probs

    @staticmethod
    def record(state: RowState, layer: int, ratios: torch.Tensor) -> None:
        """Keep one layer's ``[H]`` ratios; at the step's last read layer, the token's summaries."""
        current = state.data.setdefault("step", [])
        current.append(ratios)
        if layer != state.params.layers[-1]:
            return
        matrix = torch.stack(current)  # [L, H]: one token's ratios are complete
        state.data["step"] = []
        tokens = state.diagnostics.setdefault("per_token", [])
        tokens.append(matrix.mean())
        state.data["sum"] = state.data.get("sum", 0.0) + tokens[-1]
        state.diagnostics["mean_ratio"] = state.data["sum"] / len(tokens)
        if state.params.features:
            state.diagnostics.setdefault("features", []).append(matrix)
        if state.params.detector_weights is not None:
            state.diagnostics.setdefault("hallucination_probability", []).append(Lookback.score(state, matrix))

    @staticmethod
    def score(state: RowState, matrix: torch.Tensor) -> torch.Tensor | None:
        """The detector on the mean of the last ``window`` tokens' ``[L, H]`` rows, as P(hallucinated)."""
        p = state.params
        window = state.data.setdefault("window", [])
        window.append(matrix.flatten())
        if len(window) > p.window:
            window.pop(0)
        if len(window) < p.window:
            return None
        weights = torch.tensor(p.detector_weights, device=matrix.device, dtype=matrix.dtype)
        positive = torch.sigmoid(torch.stack(window).mean(0) @ weights + p.detector_bias)
        return 1 - positive if p.detector_convention == "factual" else positive


def lookback_ratios(row: torch.Tensor, states: list[RowState]) -> torch.Tensor:
    """``LR [n, H]`` from the new token's attention rows ``[n, H, T]``: the mean over the image tokens over that
    plus the mean over the generated tokens (the row's own prompt ``layout.length`` on)."""
    total = row.shape[-1]
    image = row_masks(states, total, row.device, "image").float()
    lengths = torch.tensor([s.layout.length for s in states], device=row.device)
    new = (torch.arange(total, device=row.device)[None, :] >= lengths[:, None]).float()
    a_img = (row * image[:, None]).sum(-1) / image.sum(-1, keepdim=True)
    a_new = (row * new[:, None]).sum(-1) / new.sum(-1, keepdim=True)
    return a_img / (a_img + a_new)
