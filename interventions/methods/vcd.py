"""VCD: visual contrastive decoding (Leng et al., CVPR 2024, §3.2-3.3, Eqs. 3-4).

A contrast branch sees the image distorted by diffusion noise, ``v' = sqrt(abar_t) v + sqrt(1 - abar_t) eps``
with ``betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5``, ``abar = cumprod(1 - betas)``,
``t = noise_step`` (500), applied as the release does to the processor's **normalised** pixel tensor (LLaVA's
``[3, H, W]``; Qwen2-VL's flattened patches, element by element, the same values rearranged);
``eps ~ N(0, 1)`` from ``torch.Generator().manual_seed(seed)`` in float32, so a request repeats. The branch
has its own row and KV cache and is fed the request's tokens. Each step, on raw logits (Eq. 3 and the
adaptive plausibility of Eq. 4):

    scores = (1 + alpha) * l(y | v, x) - alpha * l(y | v', x),  -inf where l(y | v, x) < log(beta) + max l(y | v, x)

Temperature, top-p and penalties act afterwards; greedy decoding takes the argmax (the release samples).
Defaults alpha 1 and beta 0.1 are the release's evaluation settings (its sampler's alpha default is 0.5).
Cost: a second row per request, so about twice the decode compute; its prompt costs one more prefill.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from seeright.interventions.adapters.base import EncodedPrompt
from seeright.interventions.methods.base import HookPoint, Method, Passes, RowState, plausible
from seeright.interventions.spec import VCDParams

DIFFUSION_STEPS = 1000


def diffusion_noise(pixels: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """The forward diffusion sample ``x_t`` of ``pixels`` at ``step`` (VCD's ``add_diffusion_noise``)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)[step]
    eps = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    noised = abar.sqrt() * pixels.double().cpu() + (1 - abar).sqrt() * eps.double()
    return noised.to(dtype=pixels.dtype, device=pixels.device)


class VCD(Method):
    name = "vcd"
    params_model = VCDParams
    hook_points = frozenset({HookPoint.LOGITS})
    order = 50
    literal = "seeright.interventions.literal.vcd:LiteralVCD"
    sweep = ({"alpha": 0.5},)
    branch_from_pixels = True  # the noise is added to the normalised pixel tensor

    def contrast_prompt(self, state: RowState, passes: Passes) -> EncodedPrompt:
        prompt = state.request.prompt
        return replace(prompt, images={**prompt.images, "pixel_values": self.edit_branch_pixels(prompt.images["pixel_values"], state)})

    def edit_branch_pixels(self, pixels: torch.Tensor, state: RowState) -> torch.Tensor:
        return diffusion_noise(pixels, state.params.noise_step, state.params.seed)

    def contrast(self, scores: torch.Tensor, branch: torch.Tensor, state: RowState) -> torch.Tensor:
        p = state.params
        return plausible((1 + p.alpha) * scores - p.alpha * branch, scores, p.beta)
