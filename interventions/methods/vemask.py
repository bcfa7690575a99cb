"""VE masking: visual tokens of high epistemic uncertainty masked in the vision encoder (Seo et al., NeurIPS
2025, arXiv 2510.09008, §4 and Fig. 1).

Uncertainty (the paper's proxy, Eq. 1): a PGD attack on additive image noise ``delta`` maximises the MSE
between the vision encoder's features of the clean and the attacked image,

    delta <- clip_eps(delta + step_size * sign(grad_delta MSE(f(x + delta), f(x)))),   pgd_steps times,

in [0, 1] pixel space (``x + delta`` kept in [0, 1], then normalised as the processor does), from a seeded
uniform start in ``[-epsilon, epsilon]``. ``f`` is the output of ``attack_layer`` (default the layer the LLM
reads). A patch's uncertainty is its deviation in the early layers i..j-1 (``deviation_layers``): the mean
over those layers of the per-token MSE ``mean_d (f_l(x + delta) - f_l(x))^2``.

Masking: the most uncertain ``mask_ratio`` of the patches (or those whose deviation z-score exceeds
``threshold``) are masked as attention keys (pre-softmax ``finfo.min``) in the middle layers
(``mask_layers``) of the tower's self-attention, for every query; the [CLS] token is never masked. The
language model is untouched.

The paper's hyperparameter values were not in the material available to this project (no code release was
found): every default is ours and the parameter docs say so. LLaVA only: Qwen2-VL's tower packs all images
into one variable-length attention, which the adapter does not mask (a request is refused with a 400).

Cost: at admission, one clean tower pass, ``pgd_steps`` forward + backward passes up to ``attack_layer``
(under ``torch.enable_grad``, this request's images only) and one attacked pass; the generation's own
prefill and decode cost what a plain request's do.
"""

from __future__ import annotations

import torch

from seeright.interventions.adapters.base import ModelInfo
from seeright.interventions.methods.base import HookPoint, Method, Passes, RowState, check_layers
from seeright.interventions.spec import VEMaskParams


class VEMask(Method):
    name = "vemask"
    params_model = VEMaskParams
    hook_points = frozenset({HookPoint.ANALYSIS, HookPoint.VISION})
    tower_passes = True
    order = 3
    literal = "seeright.interventions.literal.vemask:LiteralVEMask"
    sweep = ({"mask_ratio": 0.25},)

    def defaults(self, info: ModelInfo) -> dict:
        depth = info.vision_layers
        if not depth:
            return {}
        return {
            "attack_layer": depth - 1,
            "deviation_layers": list(range(max(1, round(depth / 8)))),
            "mask_layers": list(range(depth // 3, max(depth // 3 + 1, 2 * depth // 3))),
        }

    def check(self, params: VEMaskParams, info: ModelInfo) -> VEMaskParams:
        if not info.vision_layers:
            raise ValueError("this model's vision tower cannot be masked per image (Qwen2-VL packs all images into "
                             "one attention); VE masking runs on LLaVA")
        depth = info.vision_layers
        if not 0 <= params.attack_layer < depth:
            raise ValueError(f"vemask.attack_layer: {params.attack_layer} out of range for a tower read at {depth} layers")
        return params.model_copy(update={
            "deviation_layers": check_layers("vemask.deviation_layers", params.deviation_layers, depth),
            "mask_layers": check_layers("vemask.mask_layers", params.mask_layers, depth),
        })

    def prepare(self, states: list[RowState], passes: Passes) -> None:
        # One attack per request, never a batch of several requests' images: PGD follows sign(gradient), which turns
        # the last-bit differences of a batched kernel into different pixels, so a request's mask would depend on
        # its batch-mates (the batch-mate property test found it: CARVE + VE masking rows at epsilon 1).
        for state in states:
            clean, attacked = self.attack(passes, state.request.prompt.images["pixel_values"], state.params)
            deviation = self.deviation(clean, attacked, state.params)
            masked = self.select(deviation, state.params)  # [n_images, patches]
            keep = torch.ones((masked.shape[0], passes.info.vision_layers, masked.shape[1]), dtype=torch.bool)
            keep[:, state.params.mask_layers] = ~masked[:, None, :]
            state.data["keep"] = keep
            state.diagnostics["masked_tokens"] = [m.nonzero().flatten() for m in masked]
            state.diagnostics["deviation_max"] = deviation.amax(-1)

    def vision_keep(self, state: RowState) -> torch.Tensor | None:
        return state.data.get("keep")

    @staticmethod
    def attack(
        passes: Passes, pixel_values: torch.Tensor, p: VEMaskParams
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """One request's tower outputs ``[n_images, tokens, D]`` (float32) at the deviation layers, for its clean
        and its PGD-attacked images; each image's gradient is that of its own MSE (the loss sums per-image means)."""
        layers = sorted({*p.deviation_layers, p.attack_layer})
        with torch.inference_mode(False), torch.enable_grad():  # the engine admits requests in inference mode
            mean, std = (t.view(1, -1, 1, 1) for t in passes.pixel_stats())
            pixels = pixel_values.detach().clone().float().cpu()
            x = pixels * std + mean  # [0, 1] pixels
            with torch.no_grad():
                clean = {l: h.detach().float() for l, h in passes.vision_states(pixels, layers).items()}
            delta = torch.zeros_like(x)
            if p.random_start:
                noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(p.seed), dtype=torch.float32)
                delta = (noise * 2 - 1) * p.epsilon
            delta = (x + delta).clamp(0, 1) - x
            for _ in range(p.pgd_steps):
                delta.requires_grad_(True)
                attacked = passes.vision_states((x + delta - mean) / std, [p.attack_layer])[p.attack_layer]
                loss = ((attacked.float() - clean[p.attack_layer]) ** 2).flatten(1).mean(1).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + p.step_size * grad.sign()).clamp(-p.epsilon, p.epsilon)
                delta = (x + delta).clamp(0, 1) - x
            with torch.no_grad():
                attacked = passes.vision_states((x + delta - mean) / std, p.deviation_layers)
        return ({l: clean[l].detach().float().cpu() for l in p.deviation_layers},
                {l: attacked[l].detach().float().cpu() for l in p.deviation_layers})

    @staticmethod
    def deviation(clean: dict[int, torch.Tensor], attacked: dict[int, torch.Tensor], p: VEMaskParams) -> torch.Tensor:
        """Each patch's uncertainty ``[n_images, patches]``: per-token MSE, averaged over the deviation layers."""
        per_layer = [((attacked[l] - clean[l]) ** 2).mean(-1) for l in p.deviation_layers]  # [n, tokens]
        return torch.stack(per_layer).mean(0)[:, 1:]  # the patches ([CLS] first in the tower)

    @staticmethod
    def select(deviation: torch.Tensor, p: VEMaskParams) -> torch.Tensor:
        """Patches to mask, ``[n_images, patches]`` bool: top ``mask_ratio`` (ties to the lower index) or z-score > ``threshold``."""
        if p.threshold is not None:
            z = (deviation - deviation.mean(-1, keepdim=True)) / deviation.std(-1, keepdim=True).clamp_min(1e-12)
            return z > p.threshold
        k = max(1, int(p.mask_ratio * deviation.shape[-1]))
        top = torch.argsort(-deviation, dim=-1, stable=True)[:, :k]
        return torch.zeros_like(deviation, dtype=torch.bool).scatter_(-1, top, True)
