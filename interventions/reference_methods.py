"""The methods with their hot parts replaced by the literal loops of ``interventions.reference``.

Same names, parameters and passes as the fast methods; only the math runs as written in the papers,
row by row and head by head. ``seeright bench`` times them against the fast versions.
"""

from __future__ import annotations

import torch

from interventions import reference as ref
from interventions.methods.base import PassRunner, RowState
from interventions.methods.carve import CARVE, refine_image
from interventions.methods.gift import GIFT
from interventions.methods.var import VAR
from interventions.methods.vhr import VHR


class ReferenceVAR(VAR):
    def observe_hidden(self, layer: int, hidden: torch.Tensor, states: list[RowState], step: int) -> None:
        for row, state in enumerate(states):
            sinks = ref.var_sinks(hidden[row], state.params.sink_dims, state.params.tau, state.layout.pad)
            mask = torch.zeros(hidden.shape[1], dtype=torch.bool, device=hidden.device)
            mask[sinks] = True
            state.data.setdefault("sinks", {})[layer] = mask

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        out = probs.clone()
        for row, state in enumerate(states):
            p = state.params
            sinks = state.data["sinks"][layer].nonzero().flatten().tolist()
            first = max(state.layout.image_end - q0, 0) if step == 0 else 0
            vis = state.layout.image_positions.tolist()
            out[row] = ref.var_edit(probs[row], sinks, vis, p.rho, p.p, p.min_image_attention, first).to(probs.dtype)
        return out


class ReferenceVHR(VHR):
    def edit_heads(self, layer: int, heads: torch.Tensor, states: list[RowState], step: int) -> torch.Tensor:
        out = heads.clone()
        for row, state in enumerate(states):
            if step == 0:
                chosen, _ = ref.vhr_select(heads[row, -1], state.data["text_heads"][layer], state.params.outlier_filter)
                state.data.setdefault("heads", {})[layer] = chosen
            last_only = step == 0 and state.params.prefill_positions == "last"
            out[row] = ref.vhr_scale(heads[row], state.data["heads"][layer], state.params.alpha, last_only).to(heads.dtype)
        return out


class ReferenceGIFT(GIFT):
    """The release's extra saliency prefill and the enhancement as a loop over heads and tokens."""

    @staticmethod
    def _can_fuse(state: RowState) -> bool:
        return False

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        out = probs.clone()
        for row, state in enumerate(states):
            sal = state.data["saliency"].tolist()
            query = list(range(*state.layout.query_span))
            edited = ref.gift_edit_row(probs[row, :, -1], state.layout.image_positions.tolist(), query, sal, state.params.head_fraction)
            out[row, :, -1] = edited.to(probs.dtype)
        return out


class ReferenceCARVE(CARVE):
    """The release's pipeline: uncached collection with every layer's attention, loop fusion, flood-fill regions."""

    def rewrite(self, states: list[RowState], runner: PassRunner) -> None:
        model = runner.model
        eos = set(runner.eos_token_ids())
        model.set_attn_implementation("eager")
        try:
            for state in states:
                p, image = state.params, state.request.images[0]
                maps, grid = {}, None
                for key, text in (("task", state.request.turns[-1].text), ("general", p.general_instruction)):
                    turns = [*(t.without_images() for t in state.request.turns[:-1]), type(state.request.turns[-1])("user", text + p.collect_suffix, 1)]
                    prompt = runner.encode(turns, [image])
                    grid = prompt.layout.image_grids[0]
                    batch = runner.collate([prompt], [[]])
                    maps[key] = ref.carve_collect_uncached(
                        model, batch, prompt.layout.image_positions.tolist(), p.layers, p.collect_tokens, eos
                    )
                fused = ref.carve_fuse(maps["task"], maps["general"], grid, image.size, p.lam, p.steps == "all")
                mask = ref.carve_mask(fused, p.top_p, p.min_regions, p.region_fraction)
                refined, _ = refine_image(image, mask)
                images = [image, refined] if p.requery == "original_and_refined" else [refined]
                last = state.request.turns[-1]
                state.request.turns = [*(t.without_images() for t in state.request.turns[:-1]), type(last)(last.role, last.text, len(images))]
                state.request.images = images
        finally:
            model.set_attn_implementation({"text_config": "seeright"})


REFERENCE_METHODS = {"var": ReferenceVAR(), "vhr": ReferenceVHR(), "gift": ReferenceGIFT(), "carve": ReferenceCARVE()}
