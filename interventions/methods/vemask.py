"""VE masking: visual tokens of high epistemic uncertainty masked in the vision encoder (Seo et al., NeurIPS
2025, arXiv 2510.09008, §4, Fig. 1 and Fig. 5), as the official release runs it.

Uncertainty proxy (Eq. 1): a PGD attack on additive image noise ``delta`` maximises the MSE between the vision
encoder's features of the clean and the attacked image,

    delta <- clip_eps(delta + step_size * sign(grad_delta MSE(f(x + delta), f(x)))),   pgd_steps times,

in [0, 1] pixel space (``x + delta`` kept in [0, 1], then normalised as the processor does), from a seeded
uniform start in ``[-epsilon, epsilon]``; ``f`` is the output of ``attack_layer`` (default the layer the LLM
reads). The release attacks offline and saves the attacked image as a PNG, so its deltas are whole pixel levels;
here the attack runs on the processed pixels at admission and keeps them in float.

Uncertainty map (the release's caption evaluation): for each deviation layer ``l`` (the early layers i..j-1),
each token's L2 deviation ``||f_l(x + delta)_t - f_l(x)_t||`` divided by that layer's largest, then averaged
over the layers: ``U_t = mean_l n_l(t)``. A token is uncertain where ``U_t >= mean(U) + k * std(U)`` (population
std, ``threshold`` = k); [CLS] is a token like the others (``include_cls``).

Masking (Fig. 5): in the middle layers (``mask_layers``) each uncertain token's attention output is zeroed,
``M * softmax(QK^T) V`` before the output projection, so its residual stream skips those attention updates;
``mask_target="keys"`` instead hides it as a key from every query. The language model is untouched. LLaVA only:
Qwen2-VL's tower packs all images into one variable-length attention, which the adapter does not mask (400).

Cost: at admission, one clean tower pass, ``pgd_steps`` forward + backward passes up to ``attack_layer``
(under ``torch.enable_grad``, this request's images only) and one attacked pass; the generation's own prefill
and decode cost what a plain request's do. The uncertainty map is kept by the images' content and the attack's
parameters (:mod:`seeright.interventions.memo`): a second question about the same image skips the attack.
``"preset": "fast"`` cuts the attack to 20 steps.
"""

from __future__ import annotations

from functools import partial

import torch

from seeright.interventions.adapters.base import ModelInfo
from seeright.interventions.memo import tensor_key
from seeright.interventions.methods.base import HookPoint, Method, Passes, RowState, VisionMask, check_layers
from seeright.interventions.spec import VEMaskParams

RELEASE_DEPTH = 24  # CLIP ViT-L/14-336, LLaVA-1.5's tower: the depth the release's layer numbers are for
RELEASE_DEVIATION_LAYERS = 10  # "k_sig: 1.1 10" in the release's log
RELEASE_MASK_LAYERS = range(12, 18)  # "Masked layers: 12~17"
# what the uncertainty map depends on besides the images (the threshold and the masking act on it afterwards)
ATTACK_FIELDS = {"pgd_steps", "epsilon", "step_size", "random_start", "seed", "attack_layer", "deviation_layers"}


class VEMask(Method):
    name = "vemask"
    params_model = VEMaskParams
    hook_points = frozenset({HookPoint.ANALYSIS, HookPoint.VISION})
    tower_passes = True
    order = 3
    literal = "seeright.interventions.literal.vemask:LiteralVEMask"
    sweep = ({"preset": "fast"}, {"mask_target": "keys"})
    presets = {"fast": {"pgd_steps": 20}}

    def defaults(self, info: ModelInfo) -> dict:
        depth = info.vision_layers  # maskable layers: up to the one the LLM reads (23 of LLaVA-1.5's 24)
        if not depth:
            return {}
        if depth > RELEASE_MASK_LAYERS[-1]:
            deviation, masked = range(RELEASE_DEVIATION_LAYERS), RELEASE_MASK_LAYERS
        else:  # a smaller tower: the same fractions of its depth
            first = depth * RELEASE_MASK_LAYERS[0] // RELEASE_DEPTH
            deviation = range(max(1, round(depth * RELEASE_DEVIATION_LAYERS / RELEASE_DEPTH)))
            masked = range(first, max(first + 1, depth * (RELEASE_MASK_LAYERS[-1] + 1) // RELEASE_DEPTH))
        return {"attack_layer": depth - 1, "deviation_layers": list(deviation), "mask_layers": list(masked)}

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
        # The uncertainty map is a function of the images and the attack's parameters alone: once per image
        # (the release attacks each image once, offline), kept in the engine's cache for the next question about it.
        for state in states:
            p = state.params
            pixels = state.request.prompt.images["pixel_values"]
            key = (type(self).__qualname__, tensor_key(pixels), p.model_dump_json(include=ATTACK_FIELDS))  # literal: own
            uncertainty = passes.memo(key, partial(self.attack_map, passes, pixels, p))
            masked = self.select(uncertainty, p)  # [n_images, tokens], [CLS] first
            keep = torch.ones((masked.shape[0], passes.info.vision_layers, masked.shape[1]), dtype=torch.bool)
            keep[:, p.mask_layers] = ~masked[:, None, :]
            state.data["mask"] = VisionMask(p.mask_target, keep)
            state.diagnostics["masked_tokens"] = [m.nonzero().flatten() for m in masked]
            state.diagnostics["uncertainty_max"] = uncertainty.amax(-1)

    def vision_mask(self, state: RowState) -> VisionMask | None:
        return state.data.get("mask")

    def attack_map(self, passes: Passes, pixel_values: torch.Tensor, p: VEMaskParams) -> torch.Tensor:
        """The uncertainty map ``U [n_images, tokens]`` of one request's images: the attack, then Eq. 1's map."""
        return self.uncertainty(*self.attack(passes, pixel_values, p), p)

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
    def uncertainty(clean: dict[int, torch.Tensor], attacked: dict[int, torch.Tensor], p: VEMaskParams) -> torch.Tensor:
        """``U [n_images, tokens]`` ([CLS] first): per layer, each token's L2 deviation over the layer's largest
        (0 where nothing moved), averaged over the deviation layers."""
        per_layer = []
        for l in p.deviation_layers:
            norm = (attacked[l] - clean[l]).norm(dim=-1)  # [n, tokens]
            top = norm.amax(-1, keepdim=True)
            per_layer.append(torch.where(top > 0, norm / top.clamp_min(torch.finfo(norm.dtype).tiny), 0.0))
        return torch.stack(per_layer).mean(0)

    @staticmethod
    def select(uncertainty: torch.Tensor, p: VEMaskParams) -> torch.Tensor:
        """Tokens to mask, ``[n_images, tokens]`` bool ([CLS] first, never chosen unless ``include_cls``):
        ``U >= mean + k * std`` over the candidates, or their top ``mask_ratio`` (ties to the lower index)."""
        first = 0 if p.include_cls else 1
        scores = uncertainty[:, first:]
        if p.mask_ratio is not None:
            k = max(1, int(p.mask_ratio * scores.shape[-1]))
            top = torch.argsort(-scores, dim=-1, stable=True)[:, :k]
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        else:
            bar = scores.mean(-1, keepdim=True) + p.threshold * scores.std(-1, correction=0, keepdim=True)
            chosen = scores >= bar
        return torch.cat([chosen.new_zeros((chosen.shape[0], first)), chosen], dim=-1)
