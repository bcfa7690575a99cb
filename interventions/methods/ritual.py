"""RITUAL: random image transformations as a complement (Woo et al., arXiv 2405.17821, §3, Eq. 3).

A contrast branch sees ``T(v)``: one of six transformations (``seeright.interventions.image_transforms``: flips,
rotation, colour jitter, Gaussian blur, random resized crop), drawn uniformly per request from ``seed`` (or
fixed by ``transform``) and applied to the PIL image before preprocessing, fixed for the whole generation. The
branch has its own row and KV cache and is fed the request's tokens. Each step, on raw logits, with the
release's adaptive plausibility cutoff on the original logits:

    scores = l(y | v, x) + alpha * l(y | T(v), x),  -inf where l(y | v, x) < log(beta) + max l(y | v, x)

alpha (the release's ``ritual_alpha_pos``) 3, beta 0.1. The release samples; greedy takes the argmax of the
same scores. VCD and RITUAL both contrast logits against a branch and do not compose (the release offers
them as alternatives). ``diagnostics["transform"]`` names the transformation drawn. Cost: a second row per
request, about twice the decode compute, and one more image encoding and prefill.
"""

from __future__ import annotations

import torch

from seeright.interventions.adapters.base import EncodedPrompt
from seeright.interventions.image_transforms import random_transform
from seeright.interventions.methods.base import HookPoint, Method, Passes, RowState, plausible
from seeright.interventions.spec import RITUALParams


class RITUAL(Method):
    name = "ritual"
    params_model = RITUALParams
    hook_points = frozenset({HookPoint.LOGITS})
    order = 50
    literal = "seeright.interventions.literal.ritual:LiteralRITUAL"
    sweep = ({"alpha": 1.0},)

    def contrast_prompt(self, state: RowState, passes: Passes) -> EncodedPrompt:
        p, images, names = state.params, [], []
        for i, image in enumerate(state.request.images):
            name, transformed = random_transform(image, p.transform, p.seed + i, passes.info.square_image)
            images.append(transformed)
            names.append(name)
        state.diagnostics["transform"] = names
        return passes.encode(state.request.turns, images)

    def contrast(self, scores: torch.Tensor, branch: torch.Tensor, state: RowState) -> torch.Tensor:
        p = state.params
        return plausible(scores + p.alpha * branch, scores, p.beta)
