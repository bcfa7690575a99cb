"""VHR: vision-aware head reinforcement (He et al., ACL 2025, §3, Alg. 1).

VHD (Eq. 4): ``VHD_{l,i} = || A_{l,i}(y | x_V, x_T) - A_{l,i}(y | x_T) ||_2``, head i's output before
``o_proj`` at the position that predicts the first token, with and without the image. The text-only
term comes from one extra prefill of the prompt with the image removed (§4.7), run before generation.

Outliers (Eq. 6): ``VHD_{l,i} := 0`` when both ``VHD_{l,i} > mu + sigma`` and ``TA_{l,i} > mu + sigma``
over the heads of layer l, with ``TA_{l,i} = ||A_{l,i}(y | x_T)||²``. Selection (Eq. 7): heads with
``VHD_{l,i} > median_i VHD_{l,i}``. Reinforcement: ``A_{l,i} := alpha * A_{l,i}`` for selected heads.

Selection happens once, in the prefill forward of the generation, layer by layer: layer l's VHD is
measured after earlier layers were already reinforced. Heads stay fixed for the decode steps. The
text-only branch runs without reinforcement (the paper does not say otherwise). ``sigma`` is the sample
standard deviation and the median the lower median (``torch.median``), so exactly H/2 heads are kept
when VHDs are distinct. Cost: one text-only prefill; each step then only scales head outputs.

With ``heads`` given (fixed heads per layer) there is no text-only pass and no selection: only the scaling,
which needs no image. A state whose heads are all chosen, given or selected by an earlier forward of the same
prompt (the vLLM engine's layered prefill, ``service/vllm``), scales each prompt row on its own, so its prefill may be
split into chunks of rows.
"""

from __future__ import annotations

import torch

from seeright.interventions.adapters.base import ModelInfo
from seeright.interventions.methods.base import (
    HookPoint, Hooks, Method, Passes, RequestInputs, RowState, cached, check_layers, per_row,
)
from seeright.interventions.spec import VHRParams


class VHR(Method):
    name = "vhr"
    params_model = VHRParams
    hook_points = frozenset({HookPoint.ANALYSIS, HookPoint.HEADS})
    order = 30
    literal = "seeright.interventions.literal.vhr:LiteralVHR"
    sweep = ({"alpha": 1.5}, {"alpha": 4.0})

    def defaults(self, info: ModelInfo) -> dict:
        return {"layers": [1, *range(max(info.num_layers - 14, 0), info.num_layers)]}  # paper §4.4: 1 + last 14

    def check(self, params: VHRParams, info: ModelInfo) -> VHRParams:
        if params.heads is None:
            return params.model_copy(update={"layers": check_layers("vhr.layers", params.layers, info.num_layers)})
        layers = check_layers("vhr.heads", list(params.heads), info.num_layers)
        bad = sorted({h for hs in params.heads.values() for h in hs if not 0 <= h < info.num_heads})
        if bad:
            raise ValueError(f"vhr.heads: head indices {bad} out of range for a model with {info.num_heads} heads")
        heads = {layer: sorted(set(params.heads[layer])) for layer in layers}
        return params.model_copy(update={"layers": layers, "heads": heads})

    def new_state(
        self, params: VHRParams, info: ModelInfo, request: RequestInputs, companions: frozenset[str] = frozenset()
    ) -> RowState:
        if params.heads is None:
            return super().new_state(params, info, request, companions)
        state = RowState(hooks=self, params=params, request=request, companions=companions)
        for layer, chosen in params.heads.items():
            mask = torch.zeros(info.num_heads, dtype=torch.bool)
            mask[chosen] = True
            state.data.setdefault("heads", {})[layer] = mask
            state.diagnostics.setdefault("heads", {})[layer] = mask
        return state

    def prepare(self, states: list[RowState], passes: Passes) -> None:
        states = [s for s in states if s.params.heads is None]
        if not states:
            return
        capture = _TextHeadCapture()
        prompts, rows = [], []
        for state in states:
            turns = [t.without_images() for t in state.request.turns]
            prompts.append(passes.encode(turns, []))
            rows.append([RowState(hooks=capture, params=state.params, request=state.request)])
        passes.prefill(prompts, rows, stop_after_layer=max(s.params.layers[-1] for s in states))
        for state, row in zip(states, rows):
            state.data["text_heads"] = row[0].data["text_heads"]

    def wants_heads(self, state: RowState, layer: int, step: int) -> bool:
        return layer in state.params.layers

    def heads_from(self, state: RowState, layer: int, step: int) -> int | None:
        """In the prefill, scaling every row by a selection made at the last needs every row at once (0); scaling
        the last row only (``prefill_positions="last"``) needs that row (the rows before it are left as they are);
        heads already chosen scale each row on its own (None), as every decode step does."""
        if step == 0 and state.params.prefill_positions == "last" and state.layout is not None:
            return state.layout.length - 1
        return None if step > 0 or _chosen(state) else 0

    def edit_heads(self, layer: int, heads: torch.Tensor, states: list[RowState], step: int) -> torch.Tensor:
        selecting = [row for row, s in enumerate(states) if layer not in s.data.get("heads", {})]
        if step == 0 and selecting:
            self._select(layer, heads[selecting, -1].float(), [states[row] for row in selecting])
        factor = cached(states, "factor", lambda: self._factor(layer, states, heads))
        if step == 0:
            last_only = torch.tensor([s.params.prefill_positions == "last" for s in states], device=heads.device)
            positions = torch.arange(heads.shape[1], device=heads.device)
            keep = last_only[:, None] & (positions[None, :] < heads.shape[1] - 1)
            factor = torch.where(keep[:, :, None, None], torch.ones_like(factor), factor)
        return heads * factor

    @staticmethod
    def _factor(layer: int, states: list[RowState], heads: torch.Tensor) -> torch.Tensor:
        """``[n, 1, H, 1]``: alpha on the selected heads of each row, 1 elsewhere."""
        chosen = torch.stack([s.data["heads"][layer].to(heads.device) for s in states])
        alpha = per_row(states, "alpha", chosen.device)[:, None]
        return torch.where(chosen, alpha, torch.ones_like(alpha)).to(heads.dtype)[:, None, :, None]

    def _select(self, layer: int, full: torch.Tensor, states: list[RowState]) -> None:
        text = torch.stack([s.data["text_heads"][layer] for s in states]).to(full.device)  # [n, H, d]
        outlier_filter = torch.tensor([s.params.outlier_filter for s in states], device=full.device)
        chosen, outlier = select_heads(full, text, outlier_filter)
        for row, state in enumerate(states):
            state.data.setdefault("heads", {})[layer] = chosen[row]
            state.diagnostics.setdefault("heads", {})[layer] = chosen[row]
            state.diagnostics.setdefault("filtered", {})[layer] = outlier[row]


def _chosen(state: RowState) -> bool:
    """Whether the state's heads are chosen in every layer it scales (given, or selected by an earlier forward)."""
    chosen = state.data.get("heads", {})
    return all(layer in chosen for layer in state.params.layers)


def select_heads(full: torch.Tensor, text: torch.Tensor, outlier_filter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4, 6, 7 for ``n`` rows at once: head outputs ``[n, H, d]`` with and without the image at the position
    that predicts the first token, and whether each row filters outliers ``[n]``; the chosen heads and the
    filtered outliers, ``[n, H]`` bool each (the vLLM engine path's worker calls it too)."""
    vhd = (full - text).norm(dim=-1)
    ta = text.pow(2).sum(-1)
    outlier = (vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True)) & (
        ta > ta.mean(-1, keepdim=True) + ta.std(-1, keepdim=True)
    )
    outlier &= outlier_filter[:, None]
    vhd = vhd.masked_fill(outlier, 0.0)
    return vhd > vhd.median(-1, keepdim=True).values, outlier


class _TextHeadCapture(Hooks):
    """Records head outputs at the last prompt position of the text-only prefill."""

    def wants_heads(self, state: RowState, layer: int, step: int) -> bool:
        return step == 0 and layer in state.params.layers

    def heads_from(self, state: RowState, layer: int, step: int) -> int | None:
        return 0 if state.layout is None else state.layout.length - 1  # the last row's outputs, read only

    def edit_heads(self, layer: int, heads: torch.Tensor, states: list[RowState], step: int) -> torch.Tensor:
        last = heads[:, -1].float()
        for row, state in enumerate(states):
            state.data.setdefault("text_heads", {})[layer] = last[row]
        return heads
