"""ViF: visual flow between agents (Yu et al., arXiv 2509.21789, "Visual Multi-Agent System: Mitigating Hallucination
Snowballing via Visual Flow"; release YU-deep/ViF).

In a chain of agents that pass text about one image, an error one agent makes is taken up by the next ones
(snowballing); the paper finds that later agents' attention to a few image tokens, those with a unimodal attention
peak in the middle layers, fades. ViF keeps those tokens (visual relay tokens) as a visual flow beside the text and
moves attention towards them. Here an agent is a request: the first one scores and returns its relay tokens
(``choices[i].signals.vif.relay``), the next one passes them back (``interventions.vif.relay``) with the same image,
and every agent's attention is reallocated around them. The server keeps nothing between requests.

Relay tokens (release ``vif/utils/selection.py``): each image token's signal is the attention the last prompt token
gives it, averaged over heads and over the middle layers, in an unedited prefill of the request's own prompt (one
extra prefill, stopped after the last middle layer; none when ``relay`` is given). The top ``max(1, int(N *
relay_ratio))`` of the N image tokens are the relay (ties: the earlier token). The release z-scores the signal and
ranks ``sigmoid(z / omega)``: a monotone map, so ``omega`` changes nothing but float32 saturation ties among the
strongest tokens, and it is not a parameter here. The release's default criterion is the middle layer's key norm
(``use_keynorm``), the paper's alternative where attention weights cannot be read; the hook points here read them,
so the paper's attention criterion is used.

Reallocation (release ``vif/utils/reallocation.py``), per head, on every query row after the last image token (the
prompt's text rows at prefill, the new token at each decode step), in the middle and deep layers: the softmax runs at
temperature ``tau`` (``A = softmax(z / tau)``), then with ``M`` a set of keys taken from and ``R`` the keys given to,
``A' = A - alpha * A * 1_M + alpha * (sum_M A) * 1_R / (|R| + 1e-6)`` and ``A'' = A' / (sum A' + 1e-6)``:

* middle layers: ``M`` = the non-relay image tokens and the instruction tokens, ``R`` = every other key (relay tokens,
  system and template tokens, generated tokens), ``alpha = alpha_mid``;
* deep layers: ``M`` = the image tokens, ``R`` = the instruction tokens, ``alpha = alpha_deep``
  (a layer given as both gets the middle reallocation, then the deep one).

Instruction tokens are the last user turn's text (where a chain puts the earlier agents' messages). Choices the
release leaves open, made here: the release's ``R`` is over all keys, here over the keys the query row sees (a
causal model must not attend to later or padded keys); the paper's middle and deep layers are figure ranges, here the
middle and the last third of the decoder. The release's ViF block, a two-layer transformer that rewrites the relay
tokens' hidden states, is trained (its ``train_stage1.py`` and ``train_stage2.py``, the language model unfrozen in
stage 2) and no weights are published: it is not part of this training-free row.

Cost: one prefill up to the last middle layer to score the relay (none when it is given); the attention of one query
row per sequence in two thirds of the layers at decode, and a few masked sums.
"""

from __future__ import annotations

import torch

from seeright.interventions.adapters.base import ModelInfo
from seeright.interventions.methods.base import (
    HookPoint, Hooks, Method, Passes, RowState, check_layers, last_query_row, over_keys, per_row,
)
from seeright.interventions.spec import ViFParams


class ViF(Method):
    name = "vif"
    params_model = ViFParams
    hook_points = frozenset({HookPoint.ANALYSIS, HookPoint.SCORES, HookPoint.PROBS})
    order = 12  # after PAI (5) and VAR (10): their edits see the attention before its temperature and reallocation
    literal = "seeright.interventions.literal.vif:LiteralViF"
    sweep = ({"alpha_mid": 0.5, "alpha_deep": 0.2},)

    @staticmethod
    def signal_reader() -> Hooks:
        return _RelaySignal()

    @staticmethod
    def relay_tokens(signal: torch.Tensor, ratio: float) -> torch.Tensor:
        """The top ``max(1, int(N * ratio))`` of N image tokens by ``signal`` (ties: the earlier), as sorted indices."""
        k = max(1, int(len(signal) * ratio))
        order = torch.sort(signal, descending=True, stable=True).indices
        return order[:k].sort().values.cpu()

    def defaults(self, info: ModelInfo) -> dict:
        third = info.num_layers // 3
        return {"mid_layers": list(range(third, info.num_layers - third)),
                "deep_layers": list(range(info.num_layers - third, info.num_layers))}

    def check(self, params: ViFParams, info: ModelInfo) -> ViFParams:
        mid = check_layers("vif.mid_layers", params.mid_layers, info.num_layers)
        deep = check_layers("vif.deep_layers", params.deep_layers, info.num_layers)
        if not mid:
            raise ValueError("vif.mid_layers: the relay tokens are scored in the middle layers; give at least one")
        relay = None if params.relay is None else sorted(set(params.relay))
        if relay is not None and (not relay or relay[0] < 0):
            raise ValueError("vif.relay: indices of image tokens, at least one, each >= 0")
        return params.model_copy(update={"mid_layers": mid, "deep_layers": deep, "relay": relay})

    def check_prompt(self, state: RowState) -> None:
        images = len(state.request.prompt.layout.image_positions)
        if state.params.relay is not None and state.params.relay[-1] >= images:
            raise ValueError(f"vif.relay: index {state.params.relay[-1]} is past this request's {images} image tokens "
                             "(the relay comes from a request with the same images)")

    # Relay tokens ---------------------------------------------------------------------------------------
    def prepare(self, states: list[RowState], passes: Passes) -> None:
        for state in states:
            if state.params.relay is not None:
                self._keep(state, torch.tensor(state.params.relay), scored=False)
        scoring = [s for s in states if s.params.relay is None]
        if not scoring:
            return
        reader = self.signal_reader()
        rows = [[RowState(hooks=reader, params=s.params, request=s.request)] for s in scoring]
        passes.prefill([s.request.prompt for s in scoring], rows, stop_after_layer=max(s.params.mid_layers[-1] for s in scoring))
        for state, (row,) in zip(scoring, rows):
            self._keep(state, self.relay_tokens(row.data["signal"], state.params.relay_ratio), scored=True)

    @staticmethod
    def _keep(state: RowState, relay: torch.Tensor, scored: bool) -> None:
        state.data["relay"] = relay
        state.diagnostics.update(relay=relay, scored=scored)

    # Reallocation ---------------------------------------------------------------------------------------
    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        p = state.params
        if layer not in p.mid_layers and layer not in p.deep_layers:
            return None
        return state.layout.image_end if step == 0 else 0

    def row_causal(self, state: RowState, layer: int) -> bool:
        return True  # a row's reallocation reads the keys up to it, over masks known from the layout and the relay

    def edit_scores(self, layer: int, scores: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        tau = per_row(states, "tau", scores.device)[:, None, None, None]
        return torch.where(self._edited_rows(states, scores, step, q0)[:, None, :, None], scores / tau, scores)

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        n, _, q, total = probs.shape
        device = probs.device
        masks = over_keys(states, "masks", total, lambda: self._masks(states, device), False)  # [n, T, 3]
        vision, relay, instruction = masks[..., 0], masks[..., 1], masks[..., 2]
        # keys each query row sees: the row's own tokens up to its position (queries are the last q positions)
        keys = torch.arange(total, device=device)
        position = total - q + torch.arange(q, device=device)
        pads = torch.tensor([s.layout.pad for s in states], device=device)
        seen = (keys[None, None, :] >= pads[:, None, None]) & (keys[None, None, :] <= position[None, :, None])  # [n, q, T]
        edited = self._edited_rows(states, probs, step, q0)
        mid = torch.tensor([layer in s.params.mid_layers for s in states], device=device)
        deep = torch.tensor([layer in s.params.deep_layers for s in states], device=device)
        if mid.any():
            taken = (vision & ~relay) | instruction
            new = reallocate(probs, taken, seen & ~taken[:, None, :], per_row(states, "alpha_mid", device))
            probs = torch.where((edited & mid[:, None])[:, None, :, None], new, probs)
        if deep.any():
            new = reallocate(probs, vision, seen & instruction[:, None, :], per_row(states, "alpha_deep", device))
            probs = torch.where((edited & deep[:, None])[:, None, :, None], new, probs)
        return probs

    @staticmethod
    def _edited_rows(states: list[RowState], tensor: torch.Tensor, step: int, q0: int) -> torch.Tensor:
        """``[n, q]``: the query rows this method edits (at prefill the rows after each row's last image token)."""
        n, q = tensor.shape[0], tensor.shape[2]
        if step != 0:
            return torch.ones(n, q, dtype=torch.bool, device=tensor.device)
        rows = torch.arange(q0, q0 + q, device=tensor.device)
        ends = torch.tensor([s.layout.image_end for s in states], device=tensor.device)
        return rows[None, :] >= ends[:, None]

    @staticmethod
    def _masks(states: list[RowState], device: torch.device) -> torch.Tensor:
        """``[n, prompt, 3]`` bool over each row's prompt: image tokens, relay tokens, instruction tokens."""
        prompt = max(s.layout.length for s in states)
        out = torch.zeros(len(states), prompt, 3, dtype=torch.bool)
        for row, s in enumerate(states):
            image = s.layout.image_positions
            out[row, image, 0] = True
            out[row, image[s.data["relay"]], 1] = True
            out[row, :, 2] = s.layout.query_mask(prompt)
        return out.to(device)


def reallocate(probs: torch.Tensor, taken: torch.Tensor, given: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The release's reallocation on ``probs`` ``[n, H, q, T]``: each head's attention on the ``taken`` keys ``[n, T]``
    loses ``alpha`` ``[n]`` of itself, the total goes in equal parts to each query row's ``given`` keys ``[n, q, T]``,
    then ``A / (sum A + 1e-6)``."""
    moved = alpha[:, None, None, None] * probs * taken[:, None, None, :]
    give = given.float() / (given.sum(-1, keepdim=True) + 1e-6)
    new = probs - moved + moved.sum(-1, keepdim=True) * give[:, None]
    return new / (new.sum(-1, keepdim=True) + 1e-6)


class _RelaySignal(Hooks):
    """Reads, in an unedited prefill, the attention the last prompt token gives each image token, averaged over
    heads and the middle layers (``data["signal"]``, ``[N]`` float32)."""

    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        return last_query_row(state, step) if step == 0 and layer in state.params.mid_layers else None

    def reads_only(self, state: RowState, layer: int, step: int) -> bool:
        return True

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        last = probs[:, :, -1].mean(1)  # [n, T]
        for row, state in enumerate(states):
            part = last[row, state.layout.image_positions.to(last.device)] / len(state.params.mid_layers)
            state.data["signal"] = state.data.get("signal", 0) + part
        return probs
