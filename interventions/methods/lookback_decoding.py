"""Lookback Lens Guided Decoding (Chuang et al., EMNLP 2024, §4; release ``step04_run_decoding.py`` with its
patched ``transformers-4.32.0/src/transformers/generation/utils.py``, the classifier-guided sampling loop).

The answer is produced a chunk at a time. For each chunk, ``candidates`` continuations of ``chunk_tokens`` tokens
are sampled from the same prefix (temperature and nucleus sampling, the release's 0.9 and 0.95); each candidate's
features are its lookback ratios (``lookback``'s ``LR_{l,h}``, the image as the context) averaged over the
chunk's tokens, ``x = mean_t LR_t`` (L x H, layer-major); the detector scores ``z = w . x + b`` and the candidate
least likely hallucinated is kept: the smallest ``z`` for a detector of P(hallucinated), the largest for one of
P(factual) (the release's classifiers, ``predict_proba[:, 1]``, argmax). When all candidates sampled the same
tokens the first is kept (as the release does); so is the first of candidates whose logits are within ``TIE`` of
the best (identical features computed in different batch rows differ in the last bits, and must not pick at random). A candidate stops at EOS or at the token budget; the answer
stops when the kept chunk ends in EOS or is shorter than a chunk, or at a stop string.

In the serving layer the candidates are rows of the running batch (the request's own row is candidate 0), each
with its own sampler (``seed * 65536 + i``), so an answer repeats for a seed. After each chunk every candidate
row takes the kept candidate's cache row, tokens and method states, and the kept chunk is streamed.

Where the release differs by construction: its first chunk's first token comes from the prompt's forward, whose
"new tokens" mean is empty (NaN in its code); here that token has no ratio row, as in ``lookback``, so the first
chunk's features average its other tokens. The release samples each candidate with its own full prompt forward
in chunk 1; here each candidate row prefills the prompt too (same cost). The request's own temperature and top_p
are replaced by this method's for the candidates; its penalties, stop strings and budget hold.

Cost: ``candidates`` rows for the whole request (prefill and decode), attention probabilities of the new row in
every layer, and one cache-row copy per chunk.
"""

from __future__ import annotations

import torch

from seeright.interventions.adapters.base import ModelInfo
from seeright.interventions.methods.base import HookPoint, Method, RowState
from seeright.interventions.methods.lookback import lookback_ratios
from seeright.interventions.spec import LookbackDecodingParams


TIE = 1e-5  # detector logits this close count as equal: candidates whose features agree up to rounding tie


class LookbackDecoding(Method):
    name = "lookback_decoding"
    params_model = LookbackDecodingParams
    hook_points = frozenset({HookPoint.PROBS, HookPoint.CANDIDATES})
    order = 1001  # reads the probabilities every editing method has left (after lookback's own reading)
    literal = "seeright.interventions.literal.lookback_decoding:LiteralLookbackDecoding"
    mixed_traffic = False  # candidates multiply a request's rows: kept out of the mixed loads

    def check(self, params: LookbackDecodingParams, info: ModelInfo) -> LookbackDecodingParams:
        if params.detector_weights is None:
            raise ValueError("detector_weights: this model ships no Lookback Lens detector; give one (L x H weights, "
                             "detector_bias, detector_convention)")
        if len(params.detector_weights) != info.num_layers * info.num_heads:
            raise ValueError(f"detector_weights: {len(params.detector_weights)} values for {info.num_layers} layers x "
                             f"{info.num_heads} heads ({info.num_layers * info.num_heads})")
        if params.detector_convention is None:
            raise ValueError("detector_convention: say what the detector's positive class is: 'hallucinated' or 'factual'")
        return params

    def candidates(self, params: LookbackDecodingParams) -> int:
        return params.candidates

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        return 0 if step > 0 else None

    def reads_only(self, state: RowState, layer: int, step: int) -> bool:
        return True

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        ratio = lookback_ratios(probs[:, :, -1], states)  # [n, H]
        for r, state in enumerate(states):
            self.record(state, ratio[r])
        return probs

    @staticmethod
    def record(state: RowState, ratios: torch.Tensor) -> None:
        """Keep one layer's ``[H]`` ratios; once every layer is read (the detector's L x H), the token's ``[L, H]`` row."""
        current = state.data.setdefault("layers", [])
        current.append(ratios)
        if len(current) * len(ratios) == len(state.params.detector_weights):
            state.data.setdefault("rows", []).append(torch.stack(current))
            state.data["layers"] = []

    @staticmethod
    def start_chunk(state: RowState) -> None:
        """Forget the ratio rows of the chunk just decided."""
        state.data["rows"] = []

    def choose(self, states: list[RowState], chunks: list[list[int]], rows: list[int]) -> int:
        """The kept candidate: ``states[i]`` is candidate i's state, ``chunks[i]`` its chunk's tokens and ``rows[i]``
        how many of its recorded ratio rows belong to them. Records the chunk's scores in the kept state."""
        p = states[0].params
        if all(chunk == chunks[0] for chunk in chunks) or not all(rows):
            kept, z = 0, None
        else:
            weights = torch.tensor(p.detector_weights, dtype=torch.float32)
            z = torch.stack([torch.stack(s.data["rows"][:n]).float().mean(0).flatten().cpu() @ weights + p.detector_bias
                             for s, n in zip(states, rows)])
            z = z if p.detector_convention == "hallucinated" else -z  # the logit of P(hallucinated)
            kept = int((z <= z.min() + TIE).nonzero()[0])  # the first of the (numerically) best
        record = {"kept": kept, "tokens": len(chunks[kept])}
        if z is not None:
            record["hallucination_probability"] = torch.sigmoid(z)
        states[kept].diagnostics.setdefault("chunks", []).append(record)  # the kept state becomes every candidate's
        return kept
