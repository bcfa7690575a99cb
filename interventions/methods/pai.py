"""PAI: paying more attention to image (Liu et al., ECCV 2024, §3.2, Eq. 5).

On the pre-softmax attention logits ``z = QK^T / sqrt(d) + mask`` of the **last query row** (the last prompt
token at prefill, the new token at each decode step), all heads, layers ``layers`` (default 2..L-1, the
release's ``[2, 32)`` on 32 layers), the image columns get ``z <- z + alpha * |z|`` (release scripts:
alpha 0.2); the softmax follows. Other query rows and every other column are untouched. Image columns are
the row's image tokens, however many images it has (the release assumes one 576-token image at BOS + the
system text). The release edits a float16 ``z`` after the clamp to ``finfo.min``; here ``z`` is float32.

CFG branch (``cfg``, the release's ``CFG.py::CFGLogits``, off by default as in its argparse, on with
gamma 1.1 in every command of the release's README): a text-only prompt (the chat template without the image) runs as a
contrast branch with its own row and KV cache and without the attention edit; with ``s = log_softmax(l)``
and ``u = log_softmax(l_text)`` the scores are ``gamma * (s - u) + u``, at -inf where
``s < log(cfg_cutoff) + max s``.

Cost: attention scores only for the last query row of each sequence in the edited layers (one row per
sequence at decode) and one masked add; with ``cfg``, a second (text-only, shorter) row per request.
"""

from __future__ import annotations

import torch

from seeright.interventions.adapters.base import EncodedPrompt, ModelInfo
from seeright.interventions.methods.base import (
    HookPoint, Method, Passes, RowState, check_layers, last_query_row, over_keys, per_row, plausible, row_masks,
)
from seeright.interventions.spec import PAIParams


class PAI(Method):
    name = "pai"
    params_model = PAIParams
    hook_points = frozenset({HookPoint.SCORES, HookPoint.LOGITS})
    order = 5  # acts on scores, before any method that reads or edits the probabilities of the layer
    literal = "seeright.interventions.literal.pai:LiteralPAI"
    sweep = ({"alpha": 0.5},)

    def defaults(self, info: ModelInfo) -> dict:
        return {"layers": list(range(min(2, info.num_layers - 1), info.num_layers))}

    def check(self, params: PAIParams, info: ModelInfo) -> PAIParams:
        return params.model_copy(update={"layers": check_layers("pai.layers", params.layers, info.num_layers)})

    def contrasts(self, params: PAIParams) -> bool:
        return params.cfg

    def contrast_prompt(self, state: RowState, passes: Passes) -> EncodedPrompt:
        return passes.encode([turn.without_images() for turn in state.request.turns], [])

    def contrast(self, scores: torch.Tensor, branch: torch.Tensor, state: RowState) -> torch.Tensor:
        s, u = scores.log_softmax(-1), branch.log_softmax(-1)
        return plausible(state.params.gamma * (s - u) + u, s, state.params.cfg_cutoff)

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        return last_query_row(state, step) if layer in state.params.layers else None

    def edit_scores(self, layer: int, scores: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        weight = self.column_weights(states, scores.shape[-1], scores.device)[:, None, None]  # [n, 1, 1, T]
        if scores.shape[2] == 1:  # a decode step: its one query row is the last
            return torch.addcmul(scores, weight, scores.abs())
        last = scores[:, :, -1:]  # [n, H, 1, T]: the last query row of every sequence in this forward
        scores = scores.clone()
        scores[:, :, -1:] = torch.addcmul(last, weight, last.abs())
        return scores

    def column_weights(self, states: list[RowState], total: int, device: torch.device) -> torch.Tensor:
        """Each key column's boost ``[n, T]``: alpha on the row's image tokens, 0 elsewhere."""
        prompt = max(s.layout.length for s in states)
        return over_keys(states, "pai_weight", total, lambda: row_masks(states, prompt, device, "image")
                         * per_row(states, "alpha", device)[:, None], 0.0)
