"""Test-only: ViF's relay scoring, selection, temperature and reallocation as explicit loops over heads, rows and
keys (``seeright.interventions.literal.loops``).

Never on a serving path; the tests and ``seeright bench``'s literal timings use it."""

from __future__ import annotations

import torch

from seeright.interventions.literal import loops as ref
from seeright.interventions.methods.base import Hooks, RowState
from seeright.interventions.methods.vif import ViF, _RelaySignal


class _LiteralRelaySignal(_RelaySignal):
    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        for r, state in enumerate(states):
            heads = probs.shape[1]
            layers = len(state.params.mid_layers)
            part = [sum(float(probs[r, h, -1, j]) for h in range(heads)) / heads / layers
                    for j in state.layout.image_positions.tolist()]
            state.data["signal"] = [a + b for a, b in zip(state.data.get("signal", [0.0] * len(part)), part)]
        return probs


class LiteralViF(ViF):
    @staticmethod
    def signal_reader() -> Hooks:
        return _LiteralRelaySignal()

    @staticmethod
    def relay_tokens(signal, ratio: float) -> torch.Tensor:
        return torch.tensor(ref.vif_relay([float(v) for v in signal], ratio))

    def edit_scores(self, layer: int, scores: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        out = scores.clone()
        for r, state in enumerate(states):
            first = max(state.layout.image_end - q0, 0) if step == 0 else 0
            for i in range(first, scores.shape[2]):
                out[r, :, i] = scores[r, :, i] / state.params.tau
        return out

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        out = probs.clone()
        for r, state in enumerate(states):
            p, lay = state.params, state.layout
            image = lay.image_positions.tolist()
            relay = {image[j] for j in state.data["relay"].tolist()}
            instruction = set(range(*lay.query_span))
            first = max(lay.image_end - q0, 0) if step == 0 else 0
            row = probs[r]
            if layer in p.mid_layers:
                taken = {j for j in image if j not in relay} | instruction
                row = ref.vif_reallocate(row, first, lay.pad, taken, lambda j, t=taken: j not in t, p.alpha_mid).to(probs.dtype)
            if layer in p.deep_layers:
                row = ref.vif_reallocate(row, first, lay.pad, set(image), lambda j, s=instruction: j in s, p.alpha_deep).to(probs.dtype)
            out[r] = row
        return out
