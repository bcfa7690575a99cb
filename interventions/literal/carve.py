"""Test-only: CARVE as the release runs it: uncached collection, loop fusion, flood-fill regions.

Never on a serving path; the tests and ``seeright bench``'s literal timings use it."""

from __future__ import annotations

from seeright.interventions.literal import loops as ref
from seeright.interventions.methods.base import Passes, RowState
from seeright.interventions.methods.carve import CARVE, refine_image


class LiteralCARVE(CARVE):
    """The release's pipeline: uncached collection with every layer's attention, loop fusion, flood-fill regions."""

    def rewrite(self, states: list[RowState], passes: Passes) -> None:
        model = passes.model
        eos = set(passes.eos_token_ids())
        model.set_attn_implementation("eager")
        try:
            for state in states:
                p, image = state.params, state.request.images[0]
                maps, grid = {}, None
                for key, text in (("task", state.request.turns[-1].text), ("general", p.general_instruction)):
                    turns = [*(t.without_images() for t in state.request.turns[:-1]), type(state.request.turns[-1])("user", text + p.collect_suffix, 1)]
                    prompt = passes.encode(turns, [image])
                    grid = prompt.layout.image_grids[0]
                    batch = passes.batch([prompt])
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
