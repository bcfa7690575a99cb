"""Worker side of the vLLM engine path: per-request head scaling (VHR) inside vLLM's flat token batch.

vLLM runs every scheduled token of every running request as one flat batch ``[T, hidden]``; the tokens of the
persistent batch's i-th request are ``query_start_loc[i]:query_start_loc[i + 1]``, and its first one sits at
position ``num_computed_tokens[i]``. :class:`HeadScaling` is a ``worker_extension_cls``: ``seeright_install``
(called once through ``collective_rpc``) puts a pre-hook on each decoder layer's ``o_proj``, whose input is the
heads' outputs ``[T, H * d]``. At the first hooked layer of every forward the hook maps tokens to requests and
reads each request's ``SamplingParams.extra_args["seeright"]`` (the OpenAI server fills ``extra_args`` from a
request's ``vllm_xargs``); requests without it are untouched, and a forward without any costs one Python call
per layer. What a request may carry:

* ``"vhr": {"alpha", "layers", "prefill_positions", "heads" | "text_key", "outlier_filter"}``: scale the heads'
  outputs by ``alpha`` (He et al., ACL 2025, Alg. 1): at every generated position and, with
  ``prefill_positions="all"``, at every prompt position, else at the last. ``heads`` (``{"layer": [head]}``)
  fixes them; ``text_key`` names a capture of the same prompt without its images, and the heads are selected at
  the last prompt position of each layer by :func:`seeright.interventions.methods.vhr.select_heads` (Eq. 4, 6, 7) and
  kept for the request's later steps.
* ``"capture": {"key", "layers"}``: keep the heads' outputs at the last prompt position under ``key`` (the
  text-only pass of a VHR request, run as a request of its own before it).

Exactness needs the whole prompt in one forward (the engine disables chunked prefill) and eager execution (CUDA
graphs would replay without the hooks). Head selection reads all heads of a layer: tensor parallelism 1 only.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from seeright.interventions.methods.vhr import select_heads

EXTRA_ARGS_KEY = "seeright"
O_PROJ = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.o_proj$")
MAX_CAPTURES = 1024  # captures whose request never came (a cancelled client) are dropped oldest first


@dataclass
class RowPlan:
    """One request's tokens in this forward: the flat slice, the position of its first token, its prompt."""

    request_id: str
    start: int
    end: int
    first_position: int
    prompt_len: int
    args: dict[str, Any]

    def last_prompt_index(self) -> int | None:
        """Flat index of the request's last prompt token if it is in this forward, else None."""
        offset = self.prompt_len - 1 - self.first_position
        return self.start + offset if 0 <= offset < self.end - self.start else None


@dataclass
class WorkerState:
    """What the hooks keep between forwards; requests that left the batch are dropped at the next forward."""

    num_heads: int  # this rank's heads
    head_dim: int
    first_head: int  # global index of this rank's first head
    first_layer: int
    rows: list[RowPlan] = field(default_factory=list)
    captured: OrderedDict[str, dict[int, torch.Tensor]] = field(default_factory=OrderedDict)
    selected: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # each request's heads per layer


def plan_rows(runner: Any, num_tokens: int) -> list[RowPlan]:
    """The requests of this forward that carry seeright arguments, with their token slices (none for a dummy
    or profiling forward, whose tokens are not the persistent batch's)."""
    batch = runner.input_batch
    n = batch.num_reqs
    if n == 0:
        return []
    starts = runner.query_start_loc.cpu[: n + 1].tolist()
    if starts[-1] > num_tokens:
        return []
    rows = []
    for i, request_id in enumerate(batch.req_ids[:n]):
        request = runner.requests.get(request_id)
        params = getattr(request, "sampling_params", None)
        args = ((params.extra_args if params is not None else None) or {}).get(EXTRA_ARGS_KEY)
        if args:
            rows.append(RowPlan(request_id, starts[i], starts[i + 1], int(batch.num_computed_tokens_cpu[i]),
                                request.num_prompt_tokens, args))
    return rows


def _forget_finished(state: WorkerState, runner: Any) -> None:
    for request_id in [r for r in state.selected if r not in runner.requests]:
        del state.selected[request_id]


def _chosen_heads(state: WorkerState, row: RowPlan, vhr: dict[str, Any], layer: int, heads: torch.Tensor) -> torch.Tensor | None:
    """``[H_local]`` bool: the request's heads at ``layer``, fixed or selected at its last prompt position, kept
    for its later forwards (None while they cannot be selected yet)."""
    done = state.selected.setdefault(row.request_id, {})
    if layer in done:
        return done[layer]
    if "heads" in vhr:
        chosen = torch.zeros(state.num_heads, dtype=torch.bool, device=heads.device)
        local = [h - state.first_head for h in vhr["heads"].get(str(layer), []) if 0 <= h - state.first_head < state.num_heads]
        chosen[local] = True
        done[layer] = chosen
        return chosen
    last = row.last_prompt_index()
    text = state.captured.get(vhr["text_key"], {}).get(layer)
    if last is None or text is None:
        return None
    flags = torch.tensor([bool(vhr.get("outlier_filter", True))], device=heads.device)
    chosen, _ = select_heads(heads[last].float()[None], text.to(heads.device)[None], flags)
    done[layer] = chosen[0]
    if all(int(l) in done for l in vhr["layers"]):
        state.captured.pop(vhr["text_key"], None)
    return done[layer]


def _capture(state: WorkerState, row: RowPlan, capture: dict[str, Any], layer: int, heads: torch.Tensor) -> None:
    last = row.last_prompt_index()
    if last is None or layer not in capture["layers"]:
        return
    state.captured.setdefault(capture["key"], {})[layer] = heads[last].float().clone()
    while len(state.captured) > MAX_CAPTURES:
        state.captured.popitem(last=False)


def scale_heads(state: WorkerState, runner: Any, layer: int, module: torch.nn.Module, args: tuple) -> tuple | None:
    """The ``o_proj`` pre-hook: each request's scaling on its own tokens, everything else unchanged."""
    x = args[0]
    if layer == state.first_layer:
        state.rows = plan_rows(runner, x.shape[0])
        _forget_finished(state, runner)
    if not state.rows:
        return None
    heads = x.reshape(x.shape[0], state.num_heads, state.head_dim)
    factor = None
    for row in state.rows:
        if "capture" in row.args:
            _capture(state, row, row.args["capture"], layer, heads)
        vhr = row.args.get("vhr")
        if not vhr or layer not in vhr["layers"]:
            continue
        chosen = _chosen_heads(state, row, vhr, layer, heads)
        if chosen is None or not bool(chosen.any()):
            continue
        first_scaled = 0 if vhr["prefill_positions"] == "all" else row.prompt_len - 1
        lo = row.start + max(0, first_scaled - row.first_position)
        if lo >= row.end:
            continue
        if factor is None:
            factor = torch.ones(x.shape[0], state.num_heads, dtype=x.dtype, device=x.device)
        factor[lo:row.end, chosen] = float(vhr["alpha"])
    if factor is None:
        return None
    return ((heads * factor[:, :, None]).view_as(x), *args[1:])


class HeadScaling:
    """Mixed into vLLM's worker (``worker_extension_cls="seeright.service.vllm.worker.HeadScaling"``)."""

    def seeright_install(self) -> dict[str, int]:
        """Hook every decoder layer's ``o_proj`` of the language model; the layers and heads found."""
        from vllm.distributed import get_tensor_model_parallel_rank

        runner = self.model_runner  # type: ignore[attr-defined]
        config = self.vllm_config  # type: ignore[attr-defined]
        local_heads = config.model_config.get_num_attention_heads(config.parallel_config)
        layers = {
            int(m.group(1)): module for name, module in runner.get_model().named_modules()
            if (m := O_PROJ.search(name)) and "vision" not in name and "visual" not in name
        }
        if not layers:
            raise RuntimeError("no decoder layer with self_attn.o_proj found: this architecture is not hooked")
        state = WorkerState(local_heads, config.model_config.get_head_size(), get_tensor_model_parallel_rank() * local_heads, min(layers))
        for layer, module in layers.items():
            module.register_forward_pre_hook(partial(scale_heads, state, runner, layer))
        self._seeright_state = state
        return {"layers": len(layers), "heads": local_heads * config.parallel_config.tensor_parallel_size}
