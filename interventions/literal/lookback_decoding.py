"""Test-only: Lookback Lens guided decoding's ratios and choice as loops (``seeright.interventions.literal.loops``).

Never on a serving path; the tests and ``seeright bench``'s literal timings use it."""

from __future__ import annotations

import torch

from seeright.interventions.literal import loops as ref
from seeright.interventions.methods.base import RowState
from seeright.interventions.methods.lookback_decoding import LookbackDecoding


class LiteralLookbackDecoding(LookbackDecoding):
    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        for r, state in enumerate(states):
            ratios = ref.lookback_ratios(probs[r, :, -1], state.layout.image_positions.tolist(), state.layout.length)
            self.record(state, torch.tensor(ratios, dtype=torch.float32))
        return probs

    def choose(self, states: list[RowState], chunks: list[list[int]], rows: list[int]) -> int:
        p = states[0].params
        features = [[[float(v) for v in row.flatten()] for row in s.data.get("rows", [])[:n]] for s, n in zip(states, rows)]
        kept, scores = ref.guided_choice(features, chunks, p.detector_weights, p.detector_bias, p.detector_convention)
        record = {"kept": kept, "tokens": len(chunks[kept])}
        if scores is not None:
            record["hallucination_probability"] = torch.tensor(scores)
        states[kept].diagnostics.setdefault("chunks", []).append(record)
        return kept
