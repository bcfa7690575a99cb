"""PAINT: fixing imbalanced attention (arXiv 2501.12206, §3; release ``modPAI``), built on PAI.

Token selection from the CLIP tower's [CLS] -> patch attention, summed over heads (``cls_attention``, one
vision-tower pass at admission):

* local tokens: the top ``floor(local_token_ratio * N)`` (at least one) image tokens of the **first** ViT
  layer's [CLS] attention;
* summary tokens: image tokens whose [CLS] attention in LLaVA's feature layer (the penultimate) is above
  ``Q3 + summary_iqr * (Q3 - Q1)`` (quartiles by linear interpolation);
* local tokens minus summary tokens.

Modulation (PAI's Eq. 5 per column, PAI's ``edit_scores`` with other column weights): on the pre-softmax logits of the last query row, all heads, layers 2..L-1,
``z + alpha * |z|`` on local tokens and ``z + beta * |z|`` on summary tokens; other image tokens untouched.
One scalar for all heads (the abstract's "head-specific modulation" is not in the release). The release's
optional "spatial" tokens (``spatial_token_ratio``, default 0) are not built. PAI's CFG branch (``cfg``) applies
as in PAI. Needs a vision tower with a [CLS] token: on Qwen2-VL (none) a request is refused with a 400.
"""

from __future__ import annotations

import torch

from seeright.interventions.adapters.base import ModelInfo
from seeright.interventions.methods.base import HookPoint, Passes, RowState, over_keys
from seeright.interventions.methods.pai import PAI
from seeright.interventions.spec import PAINTParams


class PAINT(PAI):
    name = "paint"
    params_model = PAINTParams
    hook_points = frozenset({HookPoint.ANALYSIS, HookPoint.SCORES, HookPoint.LOGITS})
    tower_passes = True
    literal = "seeright.interventions.literal.paint:LiteralPAINT"
    sweep = ({"alpha": 0.5, "beta": 0.4},)
    presets = {"release_chair": {"alpha": 0.9, "beta": 0.3, "cfg": True, "gamma": 1.1}}  # modPAI/modpai_eval.sh

    def check(self, params: PAINTParams, info: ModelInfo) -> PAINTParams:
        if not info.vision_cls_token:
            raise ValueError("this model's vision tower has no [CLS] token (e.g. Qwen2-VL); PAINT selects image "
                             "tokens by [CLS] attention: use pai instead")
        return super().check(params, info)

    def prepare(self, states: list[RowState], passes: Passes) -> None:
        for state in states:
            local, summary = select_tokens(passes.cls_attention(state.request.prompt.images), state.params)
            state.data["local"], state.data["summary"] = local, summary
            state.diagnostics["local_tokens"], state.diagnostics["summary_tokens"] = local, summary

    def column_weights(self, states: list[RowState], total: int, device: torch.device) -> torch.Tensor:
        """Each key column's boost ``[n, T]``: alpha on local, beta on summary image tokens, 0 elsewhere."""
        prompt = max(s.layout.length for s in states)
        return over_keys(states, "paint_weight", total, lambda: torch.stack([_weights(s, prompt) for s in states]).to(device), 0.0)


def select_tokens(cls: tuple[torch.Tensor, torch.Tensor], params: PAINTParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[n_images, N]`` local and summary masks from the first and the feature layer's [CLS] attention."""
    first, feature = cls[0].float(), cls[1].float()
    n = first.shape[-1]
    k = max(1, int(params.local_token_ratio * n))
    local = torch.zeros_like(first, dtype=torch.bool).scatter_(-1, first.topk(k, dim=-1).indices, True)
    q1, q3 = torch.quantile(feature, torch.tensor([0.25, 0.75]), dim=-1, keepdim=True)
    summary = feature > q3 + params.summary_iqr * (q3 - q1)
    return local & ~summary, summary


def _weights(state: RowState, total: int) -> torch.Tensor:
    """Per-key boost of a row over ``total`` positions: alpha on local, beta on summary image tokens, 0 elsewhere."""
    weight = torch.zeros(total)
    for (start, end), local, summary in zip(state.layout.image_spans, state.data["local"], state.data["summary"]):
        weight[start:end] = local.float() * state.params.alpha + summary.float() * state.params.beta
    return weight
