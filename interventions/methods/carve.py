"""CARVE: contrastive attention refinement (Ge et al., arXiv 2509.06461, Alg. 1; release ``YuyaoGe/CARVE``).

Two greedy collection passes per request, the task query Q and a general instruction G (both with the
release's answer suffix), record at each step t and layer l the last query row's attention to image
tokens, averaged over heads: ``a_{l,t}``. Unlike the release (a full uncached forward per step, all
layers materialised), the passes use the KV cache and materialise attention only in the fused layers.

Contrast and fusion (Eq. 4.4-4.6): ``S = sum_t w_t sum_l resize(a^Q_{l,t} / (a^G_{l,t} + lam))`` over
``t < min(T_Q, T_G)``, each map reshaped to the image-token grid and bilinearly resized to the image;
``w_t = t + 1`` for ``steps="all"`` (release v4) or only ``t = 0`` with weight 1 (``"first"``).

Mask: pixels with ``S >= percentile(S, 100 (1 - top_p))``; 4-connected regions ranked by summed S; keep
``max(min_regions, int(n * region_fraction))``. The image is zeroed outside the mask, cropped to the
mask's bounding box and upscaled (Lanczos) by ``max(W / w, H / h)``. The answer is then generated from
[original, refined] (release) or the refined image alone (paper, Alg. 1), with the user's prompt.

Prompt template: the collection passes and the answer use the model's own chat template. The release's
LLaVA path writes ``"<image>\nUSER: {q}\nASSISTANT:"``, not LLaVA-1.5's ``"USER: <image>\n{q} ASSISTANT:"``; on
Qwen it uses the chat template, as here. Resolution: ``max_pixels`` fits Qwen images as the release's processor
(256*28*28) before anything else; LLaVA's processor resizes to 336 either way.

Cost: two collection passes of up to ``collect_tokens`` steps (each prefilled alone, decoded together) before
the answer, whose prompt carries a second image with the release's requery (per request: ``seeright bench``'s
record in docs/performance.md; the release reports 7.9x a plain request).

Diagnostics: ``bbox`` (the crop, pixels of the original), ``mask_fraction``, ``mask`` (the kept regions, at most
``MASK_SIDE`` cells a side) and ``steps`` (tokens of each collection pass fused).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from seeright.interventions.adapters.base import ChatTurn, ModelInfo
from seeright.interventions.methods.base import (
    HookPoint, Hooks, Method, Passes, RequestInputs, RowState, check_layers, last_query_row,
)
from seeright.interventions.spec import CARVEParams

MASK_SIDE = 64  # diagnostics carry the region mask at most this many cells a side


def fuse_contrast(
    task: list[torch.Tensor], general: list[torch.Tensor], grid: tuple[int, int], size: tuple[int, int], params: CARVEParams
) -> np.ndarray:
    """``S`` at image resolution ``(H, W)`` from per-step maps ``[len(layers), N_vis]`` of both passes."""
    width, height = size
    fused = np.zeros((height, width), dtype=np.float64)
    steps = [0] if params.steps == "first" else range(min(len(task), len(general)))
    for t in steps:
        weight = t + 1 if params.steps == "all" else 1.0
        contrast = (task[t].double() / (general[t].double() + params.lam)).cpu().numpy()
        layer_sum = np.zeros((height, width), dtype=np.float64)
        for c in contrast:
            grid_map = Image.fromarray(c.reshape(grid).astype(np.float32))
            layer_sum += np.asarray(grid_map.resize((width, height), Image.BILINEAR), dtype=np.float32)
        fused += weight * layer_sum
    return fused


def coarse_mask(mask: np.ndarray, side: int = MASK_SIDE) -> list[list[int]]:
    """The pixel mask at most ``side`` cells a side (nearest), for diagnostics: each cell is 1 where kept."""
    height, width = mask.shape
    rows = np.linspace(0, height - 1, min(side, height)).round().astype(int)
    cols = np.linspace(0, width - 1, min(side, width)).round().astype(int)
    return mask[np.ix_(rows, cols)].astype(int).tolist()


def region_mask(fused: np.ndarray, params: CARVEParams) -> np.ndarray:
    """Top ``top_p`` pixels of ``fused``, reduced to its highest-scoring connected regions (uint8 0/1)."""
    threshold = np.percentile(fused, (1.0 - params.top_p) * 100)
    mask = (fused >= threshold).astype(np.uint8)
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask)
    scores = ndimage.sum(fused, labels, range(1, count + 1))
    order = sorted(range(1, count + 1), key=lambda i: scores[i - 1], reverse=True)
    keep = order[: max(params.min_regions, int(count * params.region_fraction))]
    return np.isin(labels, keep).astype(np.uint8)


def refine_image(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Zero the image outside ``mask``, crop to the mask's bounding box, upscale to cover the original."""
    pixels = np.asarray(image.convert("RGB"))
    masked = Image.fromarray((pixels * mask[..., None]).astype(np.uint8))
    ys, xs = np.nonzero(mask)
    box = (0, 0, mask.shape[1], mask.shape[0]) if len(ys) == 0 else (
        int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    )
    crop = masked.crop(box)
    scale = max(image.width / crop.width, image.height / crop.height)
    return crop.resize((int(crop.width * scale), int(crop.height * scale)), Image.LANCZOS), box


class CARVE(Method):
    name = "carve"
    params_model = CARVEParams
    hook_points = frozenset({HookPoint.INPUT})
    order = 0  # rewrites the input: before every method that edits the generation
    literal = "seeright.interventions.literal.carve:LiteralCARVE"
    sweep = ({"top_p": 0.4},)
    mixed_traffic = False  # two collection generations per request: not part of the mixed loads

    def defaults(self, info: ModelInfo) -> dict:
        depth = info.num_layers  # release: layers 20..25 of 32, scaled to the depth
        return {"layers": list(range(round(20 * depth / 32), round(25 * depth / 32) + 1))}

    def check(self, params: CARVEParams, info: ModelInfo) -> CARVEParams:
        return params.model_copy(update={"layers": check_layers("carve.layers", params.layers, info.num_layers)})

    def new_state(
        self, params: CARVEParams, info: ModelInfo, request: RequestInputs, companions: frozenset[str] = frozenset()
    ) -> RowState:
        if len(request.images) != 1:
            raise ValueError(f"needs exactly one image in the request, got {len(request.images)}")
        return super().new_state(params, info, request, companions)

    def rewrite(self, states: list[RowState], passes: Passes) -> None:
        collector = _AttentionCollector()
        prompts, rows = [], []
        for state in states:
            question = state.request.turns[-1].text
            for key, text in (("task", question), ("general", state.params.general_instruction)):
                turns = [*(t.without_images() for t in state.request.turns[:-1]), ChatTurn("user", text + state.params.collect_suffix, 1)]
                prompts.append(passes.encode(turns, state.request.images))
                rows.append([RowState(hooks=collector, params=state.params, request=state.request, data={"maps": [], "key": key})])
        generated = passes.greedy(prompts, rows, max(s.params.collect_tokens for s in states))
        eos = set(passes.eos_token_ids())
        for i, state in enumerate(states):
            maps = {}
            for j in (2 * i, 2 * i + 1):
                tokens = generated[j][: state.params.collect_tokens]
                steps = next((k + 1 for k, tok in enumerate(tokens) if tok in eos), len(tokens))
                maps[rows[j][0].data["key"]] = rows[j][0].data["maps"][:steps]
            self._refine(state, maps, prompts[2 * i].layout.image_grids[0])

    def _refine(self, state: RowState, maps: dict[str, list[torch.Tensor]], grid: tuple[int, int]) -> None:
        image = state.request.images[0]
        fused = fuse_contrast(maps["task"], maps["general"], grid, image.size, state.params)
        mask = region_mask(fused, state.params)
        refined, box = refine_image(image, mask)
        state.diagnostics.update(bbox=box, mask_fraction=float(mask.mean()), steps=(len(maps["task"]), len(maps["general"])),
                                 mask=coarse_mask(mask))
        state.data.update(maps=maps, fused=fused, mask=mask, refined=refined)
        images = [image, refined] if state.params.requery == "original_and_refined" else [refined]
        last = state.request.turns[-1]
        state.request.turns = [*(t.without_images() for t in state.request.turns[:-1]), ChatTurn(last.role, last.text, len(images))]
        state.request.images = images


class _AttentionCollector(Hooks):
    """Records ``mean_h A[h, last, image]`` per step for the fused layers (one ``[L', N_vis]`` per step)."""

    def reads_only(self, state: RowState, layer: int, step: int) -> bool:
        return True

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        if layer not in state.params.layers:
            return None
        return last_query_row(state, step)

    def edit_probs(
        self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int
    ) -> torch.Tensor:
        last = probs[:, :, -1].mean(1)  # [n, T]
        for row, state in enumerate(states):
            maps = state.data["maps"]
            if layer == state.params.layers[0]:  # a forward's first read: a new step (its number is not needed)
                maps.append([])
            maps[-1].append(last[row, state.layout.image_positions.to(probs.device)])
            if len(maps[-1]) == len(state.params.layers):
                maps[-1] = torch.stack(maps[-1])
        return probs
