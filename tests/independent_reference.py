"""Independent references: each method written again from its paper and release, on a stock model.

Nothing here comes from ``interventions/``: no layouts, no masks, no hooks, no helpers. The model is an
untouched copy of a tiny test model whose language model runs ``reference_eager``, an attention function
written out below (scores, causal mask, float32 softmax, a per-layer edit callback, ``P @ V``); the rest
uses plain forward hooks (residual stream entering a layer, ``o_proj`` inputs). Generation is greedy with no
KV cache: every step recomputes the whole sequence, and each query row gets the edit rule of the step at
which a cached decoder computed it (prompt rows: the prefill's; generated rows: the decode step's). So the
comparison also covers the fast path's cache, its plans over prefill and decode, and its batching.

What the references take from the caller is tokenisation only: the prompt's token ids and image tensors,
and, for GIFT, where the question's (content-word) tokens are. Image positions, grids, sinks, heads,
saliency maps and masks are all derived here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AttentionInterface

NAME = "reference_eager"
EditFn = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, probs [H, T, T]) -> probs; or scores, pre-softmax


@dataclass
class Prompt:
    """Tokenised inputs of one prompt (batch of one, no padding) and the question's token positions."""

    inputs: dict[str, torch.Tensor]
    image_token_id: int
    query: tuple[int, int] = (0, 0)
    content: tuple[int, ...] = ()

    @property
    def ids(self) -> torch.Tensor:
        return self.inputs["input_ids"][0]

    @property
    def image_positions(self) -> list[int]:
        return (self.ids == self.image_token_id).nonzero().flatten().tolist()


@dataclass
class Run:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class ReferenceModel:
    """A stock model whose text attention is ``reference_eager``; ``edit`` is the active callback."""

    def __init__(self, model: torch.nn.Module, eos: list[int]) -> None:
        AttentionInterface.register(NAME, self._attention)
        model.set_attn_implementation({"text_config": NAME})
        self.model, self.eos = model.eval(), set(eos)
        self.edit: EditFn | None = None
        self.score_edit: EditFn | None = None
        self.layers = model.model.language_model.layers
        cfg = model.config.get_text_config()
        self.num_heads, self.head_dim = cfg.num_attention_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = (query @ key.transpose(-1, -2)).float() * scale  # [1, H, q, T]
        q, t = scores.shape[-2:]
        causal = torch.arange(t)[None, :] <= torch.arange(t - q, t)[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        if self.score_edit is not None:
            scores = self.score_edit(module.layer_idx, scores[0])[None]
        probs = torch.softmax(scores, dim=-1)
        if self.edit is not None:
            probs = self.edit(module.layer_idx, probs[0])[None]
        out = probs.to(value.dtype) @ value  # [1, H, q, d]
        return out.transpose(1, 2).contiguous(), probs

    @contextmanager
    def hooks(
        self, pre_layer: Callable | None = None, o_proj: Callable | None = None, edit: EditFn | None = None,
        score_edit: EditFn | None = None,
    ):
        """Plain forward pre-hooks for the duration of a run: ``pre_layer(layer, hidden [T, D])`` and
        ``o_proj(layer, heads [T, H, d]) -> heads``; ``edit`` and ``score_edit`` for the attention."""
        handles = []
        for l, layer in enumerate(self.layers):
            if pre_layer is not None:
                handles.append(layer.register_forward_pre_hook(
                    lambda m, a, k, l=l: pre_layer(l, (a[0] if a else k["hidden_states"])[0]), with_kwargs=True))
            if o_proj is not None:
                def hook(m, args, l=l):
                    x = args[0]
                    heads = o_proj(l, x[0].view(x.shape[1], self.num_heads, self.head_dim))
                    return (heads.reshape(x.shape),)
                handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
        self.edit, self.score_edit = edit, score_edit
        try:
            yield
        finally:
            self.edit = self.score_edit = None
            for h in handles:
                h.remove()

    def forward(self, prompt: Prompt, generated: list[int]) -> torch.Tensor:
        """Last-position logits of the prompt followed by ``generated`` (recomputed from scratch)."""
        ids = torch.cat([prompt.ids, torch.tensor(generated, dtype=torch.long)])[None]
        inputs = {**prompt.inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "mm_token_type_ids" in inputs:  # Qwen2-VL's M-RoPE: 1 on image tokens, 0 on text
            inputs["mm_token_type_ids"] = (ids == prompt.image_token_id).to(torch.int32)
        with torch.no_grad():
            return self.model(**inputs, use_cache=False).logits[0, -1].float()

    def greedy(self, prompt: Prompt, max_new_tokens: int, on_step: Callable[[int], None] | None = None) -> Run:
        """Greedy decoding, stopping after an end-of-sequence token; ``on_step(t)`` before forward t."""
        def step(tokens: list[int]) -> torch.Tensor:
            if on_step is not None:
                on_step(len(tokens))
            return self.forward(prompt, tokens)

        return self._decode(step, max_new_tokens)

    def contrast_greedy(
        self, prompt: Prompt, branch: Prompt, combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        max_new_tokens: int, edit: Callable[[], Any] | None = None,
    ) -> Run:
        """Greedy decoding on ``combine(logits, branch_logits)``: the branch is fed the same tokens, with no
        edit (``edit()`` is a context manager active for the request's own forward only)."""
        def step(tokens: list[int]) -> torch.Tensor:
            with edit() if edit is not None else nullcontext():
                own = self.forward(prompt, tokens)
            return combine(own, self.forward(branch, tokens))

        return self._decode(step, max_new_tokens)

    def _decode(self, step: Callable[[list[int]], torch.Tensor], max_new_tokens: int) -> Run:
        """Argmax of ``step(tokens so far)`` until an end-of-sequence token or ``max_new_tokens``."""
        run = Run()
        for _ in range(max_new_tokens):
            logprobs = step(run.tokens).log_softmax(-1)
            token = int(logprobs.argmax())
            run.tokens.append(token)
            run.logprobs.append(float(logprobs[token]))
            if token in self.eos:
                break
        return run


def cutoff(scores: torch.Tensor, own: torch.Tensor, beta: float) -> torch.Tensor:
    """Adaptive plausibility: keep tokens whose probability under ``own`` is at least beta times the top one."""
    probs = own.softmax(-1)
    return torch.where(probs >= beta * probs.max(), scores, torch.full_like(scores, float("-inf")))


# ---- VCD (Leng et al., CVPR 2024, Eqs. 3-4; release vcd_utils) ----------------------------------------
def vcd_noised(prompt: Prompt, p: Any) -> Prompt:
    """The release's forward diffusion at step ``noise_step`` on the normalised pixels; eps from a
    ``torch.Generator`` seeded with ``seed`` (float32 ``randn`` of the pixel tensor's shape)."""
    t = np.arange(1000)
    betas = 1 / (1 + np.exp(-(-6 + 12 * t / 999))) * (5e-3 - 1e-5) + 1e-5
    abar = float(np.prod(1 - betas[: p.noise_step + 1]))
    pixels = prompt.inputs["pixel_values"]
    eps = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(p.seed), dtype=torch.float32)
    noised = (math.sqrt(abar) * pixels.double() + math.sqrt(1 - abar) * eps.double()).to(pixels.dtype)
    return Prompt({**prompt.inputs, "pixel_values": noised}, prompt.image_token_id)


def vcd_generate(ref: ReferenceModel, prompt: Prompt, p: Any, max_new_tokens: int) -> Run:
    def combine(own: torch.Tensor, noised: torch.Tensor) -> torch.Tensor:
        return cutoff((1 + p.alpha) * own - p.alpha * noised, own, p.beta)

    return ref.contrast_greedy(prompt, vcd_noised(prompt, p), combine, max_new_tokens)


# ---- RITUAL (Woo et al., arXiv 2405.17821, Eq. 3; release ritual_utils) --------------------------------
def ritual_generate(ref: ReferenceModel, prompt: Prompt, transformed: Prompt, p: Any, max_new_tokens: int) -> Run:
    def combine(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return cutoff(own + p.alpha * other, own, p.beta)

    return ref.contrast_greedy(prompt, transformed, combine, max_new_tokens)


def flipped(image: Image.Image, how: str) -> Image.Image:
    pixels = np.asarray(image.convert("RGB"))
    return Image.fromarray(np.ascontiguousarray(pixels[:, ::-1] if how == "horizontal_flip" else pixels[::-1]))


# ---- PAI (Liu et al., ECCV 2024, Eq. 5; release attention.py::llama_new_forward) ---------------------
def pai_boost(prompt: Prompt, p: Any) -> EditFn:
    """The last prompt row (prefill) and every generated row (decode steps) boost their image columns'
    pre-softmax scores: z + alpha * |z|, in layers ``p.layers``."""
    vis, first = prompt.image_positions, len(prompt.ids) - 1

    def boost(layer: int, scores: torch.Tensor) -> torch.Tensor:  # [H, T, T], no cache: every row
        if layer not in p.layers:
            return scores
        out = scores.clone()
        z = scores[:, first:, vis]
        out[:, first:, vis] = z + p.alpha * z.abs()
        return out

    return boost


def pai_generate(ref: ReferenceModel, prompt: Prompt, p: Any, max_new_tokens: int) -> Run:
    with ref.hooks(score_edit=pai_boost(prompt, p)):
        return ref.greedy(prompt, max_new_tokens)


# ---- PAINT (arXiv 2501.12206, §3; release modPAI) --------------------------------------------------------
def paint_tokens(tower: torch.nn.Module, pixel_values: torch.Tensor, feature_layer: int, p: Any) -> tuple[list[int], list[int]]:
    """Local and summary patch indices of one image from a stock tower's eager attentions: local = top
    floor(ratio * N) of the first layer's [CLS] row (summed over heads) minus summary; summary = the feature
    layer's [CLS] row above Q3 + k * IQR (numpy's linear quantiles)."""
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = tower(pixel_values, output_attentions=True).attentions
    first = attentions[0][0, :, 0, 1:].sum(0).double().numpy()
    feature = attentions[feature_layer][0, :, 0, 1:].sum(0).double().numpy()
    q1, q3 = np.quantile(feature, [0.25, 0.75])
    summary = [int(j) for j in np.nonzero(feature > q3 + p.summary_iqr * (q3 - q1))[0]]
    top = np.argsort(-first, kind="stable")[: max(1, int(p.local_token_ratio * len(first)))]
    return sorted(set(int(j) for j in top) - set(summary)), summary


def paint_generate(ref: ReferenceModel, prompt: Prompt, local: list[int], summary: list[int], p: Any, max_new_tokens: int) -> Run:
    """PAI's boost per column: alpha on local image tokens, beta on summary ones (indices into the image's tokens)."""
    vis, first = prompt.image_positions, len(prompt.ids) - 1
    columns = [(vis[j], p.alpha) for j in local] + [(vis[j], p.beta) for j in summary]

    def boost(layer: int, scores: torch.Tensor) -> torch.Tensor:
        if layer not in p.layers:
            return scores
        out = scores.clone()
        for column, weight in columns:
            z = scores[:, first:, column]
            out[:, first:, column] = z + weight * z.abs()
        return out

    with ref.hooks(score_edit=boost):
        return ref.greedy(prompt, max_new_tokens)


def pai_cfg_generate(ref: ReferenceModel, prompt: Prompt, text_only: Prompt, p: Any, max_new_tokens: int) -> Run:
    """PAI with its CFG branch (release CFG.py): the text-only prompt runs without the boost."""
    def combine(own: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        s, u = own.log_softmax(-1), text.log_softmax(-1)
        return cutoff(p.gamma * (s - u) + u, own, p.cfg_cutoff)

    return ref.contrast_greedy(prompt, text_only, combine, max_new_tokens, edit=lambda: ref.hooks(score_edit=pai_boost(prompt, p)))


# ---- VAR (Kang et al., ICLR 2025, §3; release HeadFork / VARProcessor) ----------------------------------
def var_generate(ref: ReferenceModel, prompt: Prompt, p: Any, max_new_tokens: int) -> Run:
    vis = prompt.image_positions
    image_end = vis[-1] + 1
    prompt_len = len(prompt.ids)
    sinks: dict[int, list[int]] = {}
    step = [0]

    def find_sinks(layer: int, hidden: torch.Tensor) -> None:
        if step[0] != 0 or layer not in p.layers:
            return
        found = []
        for j in range(prompt_len):
            x = hidden[j].double()
            rms = math.sqrt(float((x * x).mean()) + 1e-6)
            if max(abs(float(x[d])) / rms for d in p.sink_dims) > p.tau:  # strict, as released
                found.append(j)
        sinks[layer] = found

    def redistribute(layer: int, probs: torch.Tensor) -> torch.Tensor:
        if layer not in p.layers:
            return probs
        sink = sinks[layer]
        vis_sink = [j for j in vis if j in sink]
        free = [j for j in vis if j not in sink]
        if not vis_sink:
            return probs
        out = probs.clone()
        for h in range(probs.shape[0]):
            for i in range(image_end, probs.shape[1]):  # text rows after the image, and every generated row
                a = probs[h, i].double()
                vis_att = float(a[vis].sum())
                portion = float(a[vis_sink].sum()) / float((a[vis] + 1e-6).sum())
                free_sum = float(a[free].sum())
                if not (portion <= 1 - p.rho and vis_att >= p.min_image_attention and free_sum > 0):
                    continue
                budget = p.p * float(a[sink].sum())
                row = a.clone()
                row[sink] = a[sink] * (1 - p.p)
                row[free] = a[free] + budget * a[free] / free_sum
                out[h, i] = row.float()
        return out

    def on_step(t: int) -> None:
        step[0] = t

    with ref.hooks(pre_layer=find_sinks, edit=redistribute):
        return ref.greedy(prompt, max_new_tokens, on_step)


# ---- VHR (He et al., ACL 2025, §3 Eq. 4-7, Alg. 1) ------------------------------------------------------
def vhr_generate(ref: ReferenceModel, prompt: Prompt, text_only: Prompt, p: Any, max_new_tokens: int) -> Run:
    text_heads: dict[int, torch.Tensor] = {}

    def record(layer: int, heads: torch.Tensor) -> torch.Tensor:
        text_heads[layer] = heads[-1].double().clone()
        return heads

    with ref.hooks(o_proj=record):
        ref.forward(text_only, [])
    prompt_len, chosen, step = len(prompt.ids), {}, [0]

    def reinforce(layer: int, heads: torch.Tensor) -> torch.Tensor:
        if layer not in p.layers:
            return heads
        if step[0] == 0:  # select once, layer by layer, at the position that predicts the first token
            full, text = heads[prompt_len - 1].double(), text_heads[layer]
            n = full.shape[0]
            vhd = [float((full[i] - text[i]).norm()) for i in range(n)]
            ta = [float((text[i] ** 2).sum()) for i in range(n)]
            if p.outlier_filter:
                mv, sv = _mean_std(vhd)
                mt, st = _mean_std(ta)
                vhd = [0.0 if vhd[i] > mv + sv and ta[i] > mt + st else vhd[i] for i in range(n)]
            median = sorted(vhd)[(n - 1) // 2]  # the lower median
            chosen[layer] = [i for i in range(n) if vhd[i] > median]
        first = 0 if p.prefill_positions == "all" else prompt_len - 1
        out = heads.clone()
        for i in chosen[layer]:
            out[first:, i] = heads[first:, i] * p.alpha
        return out

    def on_step(t: int) -> None:
        step[0] = t

    with ref.hooks(o_proj=reinforce):
        return ref.greedy(prompt, max_new_tokens, on_step)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mu = sum(values) / len(values)
    return mu, math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))


# ---- GIFT (arXiv 2510.22067; release compute_visual_saliency_map and the enhancement) ---------------------
def gift_saliency(ref: ReferenceModel, prompt: Prompt, p: Any) -> torch.Tensor:
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int, probs: torch.Tensor) -> torch.Tensor:
        if layer in p.saliency_layers:
            kept[layer] = probs.double().clone()
        return probs

    with ref.hooks(edit=keep):
        ref.forward(prompt, [])
    vis = prompt.image_positions
    q0, q1 = prompt.query
    rows = list(range(q1 - q0)) if p.content_words == "all" else [c - q0 for c in prompt.content]
    rows = rows or list(range(q1 - q0))
    per_layer = []
    for layer in p.saliency_layers:
        a = kept[layer]
        shift = (a[:, q0:q1][:, :, vis] - a[:, q0 - 1 : q1 - 1][:, :, vis]).clamp_min(0)[:, rows]  # [H, rows, N_vis]
        k = max(1, int(a.shape[0] * p.head_fraction))
        heads = torch.topk(shift.sum((1, 2)), k).indices.tolist()
        per_layer.append(shift[heads])
    s = torch.cat([x.reshape(-1, len(vis)) for x in per_layer]).mean(0)
    mean, std = s.mean(), s.std()
    s = s.clamp(mean - p.clip_sigma * std, mean + p.clip_sigma * std)
    span = s.max() - s.min()
    s = (s - s.min()) / span * p.alpha if span > 0 else torch.zeros_like(s)  # constant saliency: a flat map
    return s.exp()


def gift_generate(ref: ReferenceModel, prompt: Prompt, p: Any, max_new_tokens: int) -> Run:
    sal = gift_saliency(ref, prompt, p)
    vis = prompt.image_positions
    query = list(range(*prompt.query))
    prompt_len = len(prompt.ids)

    def enhance(layer: int, probs: torch.Tensor) -> torch.Tensor:
        if layer not in p.enhance_layers:
            return probs
        out = probs.clone()
        k = max(1, int(probs.shape[0] * p.head_fraction))
        for i in range(prompt_len - 1, probs.shape[1]):  # the last row of every forward
            row = probs[:, i].double()
            av, aq = row[:, vis], row[:, query]
            hv = torch.topk(av.sum(-1), k).indices.tolist()
            hq = torch.topk(aq.sum(-1), k).indices.tolist()
            r = float((av[hv] * sal).sum() / av[hv].sum())
            new = row.clone()
            for h in hv:
                new[h, vis] = row[h, vis] * sal
            for h in hq:
                new[h, query] = new[h, query] * r
            out[:, i] = (new / new.sum(-1, keepdim=True)).float()
        return out

    with ref.hooks(edit=enhance):
        return ref.greedy(prompt, max_new_tokens)


# ---- CARVE (arXiv 2509.06461, Alg. 1, Eq. 4.4-4.6; release v4) -------------------------------------------
def carve_collect(ref: ReferenceModel, prompt: Prompt, layers: list[int], steps: int) -> list[np.ndarray]:
    """Per step, ``[len(layers), N_vis]``: the last row's attention to image tokens, mean over heads."""
    vis, maps, current = prompt.image_positions, [], {}

    def record(layer: int, probs: torch.Tensor) -> torch.Tensor:
        if layer in layers:
            current[layer] = probs[:, -1, vis].double().mean(0).numpy()
        return probs

    def on_step(t: int) -> None:
        if current:
            maps.append(np.stack([current[l] for l in layers]))

    with ref.hooks(edit=record):
        ref.greedy(prompt, steps, on_step)
    maps.append(np.stack([current[l] for l in layers]))
    return maps


def carve_mask(task: list[np.ndarray], general: list[np.ndarray], grid: tuple[int, int], size: tuple[int, int], p: Any) -> np.ndarray:
    width, height = size
    fused = np.zeros((height, width))
    steps = [0] if p.steps == "first" else range(min(len(task), len(general)))
    for t in steps:
        weight = t + 1 if p.steps == "all" else 1.0
        layer_sum = np.zeros((height, width))
        for a_q, a_g in zip(task[t], general[t]):
            ratio = (a_q / (a_g + p.lam)).reshape(grid).astype(np.float32)
            layer_sum += np.asarray(Image.fromarray(ratio, mode="F").resize((width, height), Image.BILINEAR), dtype=np.float32)
        fused += weight * layer_sum
    keep = fused >= np.percentile(fused, (1 - p.top_p) * 100)
    regions = _regions(keep)
    regions.sort(key=lambda cells: -sum(fused[y, x] for y, x in cells))
    mask = np.zeros((height, width), dtype=np.uint8)
    for cells in regions[: max(p.min_regions, int(len(regions) * p.region_fraction))]:
        for y, x in cells:
            mask[y, x] = 1
    return mask


def _regions(keep: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected regions of True pixels, by flood fill."""
    seen, regions = np.zeros_like(keep, dtype=bool), []
    for y0, x0 in zip(*np.nonzero(keep)):
        if seen[y0, x0]:
            continue
        stack, cells = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            cells.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < keep.shape[0] and 0 <= nx < keep.shape[1] and keep[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        regions.append(cells)
    return regions


def carve_refine(image: Image.Image, mask: np.ndarray) -> Image.Image:
    pixels = np.asarray(image.convert("RGB")) * mask[..., None]
    ys, xs = np.nonzero(mask)
    box = (0, 0, mask.shape[1], mask.shape[0]) if len(ys) == 0 else (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    crop = Image.fromarray(pixels.astype(np.uint8)).crop(tuple(int(v) for v in box))
    scale = max(image.width / crop.width, image.height / crop.height)
    return crop.resize((int(crop.width * scale), int(crop.height * scale)), Image.LANCZOS)


# ---- VE masking (arXiv 2510.09008, Eq. 1 and §4) ---------------------------------------------------------
def _tower_states(tower: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The stock tower's hidden states: the embeddings, then each layer's output."""
    return tower(pixels, output_hidden_states=True).hidden_states


def vemask_map(tower: torch.nn.Module, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, p: Any) -> list[np.ndarray]:
    """The uncertainty map per image ([CLS] first): PGD (sign steps, L-inf ball, [0, 1] pixel box) maximising the
    MSE of the attack layer's output; then the release's map (per layer, token L2 deviation over the layer's
    maximum, averaged over the deviation layers)."""
    mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    x = pixels * std + mean
    with torch.no_grad():
        clean = _tower_states(tower, pixels)
    delta = torch.zeros_like(x)
    if p.random_start:
        delta = (torch.rand(x.shape, generator=torch.Generator().manual_seed(p.seed)) * 2 - 1) * p.epsilon
    delta = torch.clamp(x + delta, 0, 1) - x
    for _ in range(p.pgd_steps):
        d = delta.clone().requires_grad_(True)
        out = _tower_states(tower, (x + d - mean) / std)[p.attack_layer + 1]
        ((out - clean[p.attack_layer + 1]) ** 2).mean().backward()
        delta = torch.clamp(delta + p.step_size * d.grad.sign(), -p.epsilon, p.epsilon)
        delta = torch.clamp(x + delta, 0, 1) - x
    with torch.no_grad():
        attacked = _tower_states(tower, (x + delta - mean) / std)
    out = []
    for i in range(pixels.shape[0]):
        maps = []
        for l in p.deviation_layers:
            norm = np.linalg.norm((attacked[l + 1][i] - clean[l + 1][i]).double().numpy(), axis=-1)
            maps.append(norm / norm.max() if norm.max() > 0 else np.zeros_like(norm))
        out.append(np.mean(maps, axis=0))
    return out


def vemask_tokens(tower: torch.nn.Module, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, p: Any) -> list[list[int]]:
    """Masked token indices per image ([CLS] = 0): U >= mean + k * population std, or the top floor(ratio * N),
    over [CLS] and the patches (the patches only without ``include_cls``)."""
    out = []
    for u in vemask_map(tower, pixels, mean, std, p):
        first = 0 if p.include_cls else 1
        cand = u[first:]
        if p.mask_ratio is not None:
            chosen = np.argsort(-cand, kind="stable")[: max(1, int(p.mask_ratio * len(cand)))]
        else:
            chosen = np.nonzero(cand >= cand.mean() + p.threshold * cand.std())[0]
        out.append(sorted(int(j) + first for j in chosen))
    return out


def _masked_tower_states(tower: torch.nn.Module, pixels: torch.Tensor, masked: list[list[int]], layers: list[int], target: str) -> tuple:
    """The tower's hidden states with attention written out; in ``layers``, tokens ``masked[i]`` of image i get
    a zero attention output (``target="outputs"``: M * softmax(QK^T)V, Fig. 5) or -inf key columns ("keys")."""
    vision = getattr(tower, "vision_model", tower)  # transformers 4 nests the transformer, 5 does not
    h = vision.pre_layrnorm(vision.embeddings(pixels))
    states = [h]
    for l, layer in enumerate(vision.encoder.layers):
        attn, x = layer.self_attn, layer.layer_norm1(h)
        n, t, width = x.shape
        split = lambda proj: proj(x).view(n, t, attn.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.q_proj), split(attn.k_proj), split(attn.v_proj)
        scores = (q @ k.transpose(-1, -2)).float() * attn.scale
        if l in layers and target == "keys":
            for i, tokens in enumerate(masked):
                scores[i, :, :, tokens] = float("-inf")
        out = (torch.softmax(scores, dim=-1).to(v.dtype) @ v).transpose(1, 2).reshape(n, t, width)
        if l in layers and target == "outputs":
            rows = torch.ones(n, t, 1, dtype=out.dtype)
            for i, tokens in enumerate(masked):
                rows[i, tokens] = 0
            out = out * rows
        h = h + attn.out_proj(out)
        h = h + layer.mlp(layer.layer_norm2(h))
        states.append(h)
    return tuple(states)


def vemask_generate(ref: ReferenceModel, prompt: Prompt, mean: torch.Tensor, std: torch.Tensor, p: Any, max_new_tokens: int) -> Run:
    """Greedy decoding with the tower's hidden states replaced by the masked forward's."""
    tower = ref.model.model.vision_tower
    pixels = prompt.inputs["pixel_values"].float()
    masked = vemask_tokens(tower, pixels, mean, std, p)

    def replace(module, args, output):
        with torch.no_grad():
            output.hidden_states = _masked_tower_states(tower, pixels, masked, p.mask_layers, p.mask_target)
        return output

    handle = tower.register_forward_hook(replace)
    try:
        return ref.greedy(prompt, max_new_tokens)
    finally:
        handle.remove()


# ---- Lookback Lens guided decoding (Chuang et al., EMNLP 2024, §4; release generation/utils.py) -------------
def _nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Temperature, then the smallest set of tokens whose mass reaches top_p (the token crossing it kept), then
    one multinomial draw from the candidate's own generator."""
    scaled = (logits - logits.max()) / temperature
    probs = torch.softmax(scaled, -1)
    order = torch.argsort(scaled, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for j in order.tolist():
        if mass >= top_p:
            break
        keep[j] = True
        mass += float(probs[j])
    kept = torch.softmax(scaled.masked_fill(~keep, float("-inf")), -1)
    return int(torch.multinomial(kept, 1, generator=generator))


def lookback_decoding_generate(ref: ReferenceModel, prompt: Prompt, p: Any, max_new_tokens: int) -> Run:
    """Chunks of ``chunk_tokens``: each of ``candidates`` samplers (seeded ``seed * 65536 + i``, kept across chunks)
    continues the kept answer until the chunk is full, EOS or the budget; a candidate's features are the mean over
    its decode forwards of LR[l, h] = mean(attention on image) / (that + mean(attention on generated tokens)) of the
    last row; the kept candidate has the lowest P(hallucinated) (detector logits within 1e-5 tie, the first wins; the
    first when all chunks agree)."""
    image, length = prompt.image_positions, len(prompt.ids)
    weights = np.asarray(p.detector_weights, dtype=np.float64)
    samplers = [torch.Generator().manual_seed(p.seed * 65536 + i) for i in range(p.candidates)]
    run = Run()
    run.chunk_probabilities = []  # per chunk, each candidate's P(hallucinated) (None where nothing was scored)
    while len(run.tokens) < max_new_tokens:
        chunks = []
        for sampler in samplers:
            tokens, logprobs, rows = [], [], []
            while len(tokens) < p.chunk_tokens and len(run.tokens) + len(tokens) < max_new_tokens:
                per_layer: dict[int, np.ndarray] = {}

                def read(layer: int, probs: torch.Tensor) -> torch.Tensor:
                    last = probs[:, -1].double().numpy()  # [H, T]
                    a_img = last[:, image].mean(-1)
                    a_new = last[:, length:].mean(-1) if last.shape[-1] > length else np.full(len(last), np.nan)
                    per_layer[layer] = a_img / (a_img + a_new)
                    return probs

                with ref.hooks(edit=read):
                    logits = ref.forward(prompt, run.tokens + tokens)
                if run.tokens + tokens:  # a decode forward (the prompt's own forward has no generated tokens)
                    rows.append(np.concatenate([per_layer[l] for l in sorted(per_layer)]))
                token = _nucleus_sample(logits, p.temperature, p.top_p, sampler)
                tokens.append(token)
                logprobs.append(float(logits.log_softmax(-1)[token]))
                if token in ref.eos:
                    break
            chunks.append((tokens, logprobs, rows))
        if all(c[0] == chunks[0][0] for c in chunks) or not all(c[2] for c in chunks):
            kept = 0
            run.chunk_probabilities.append(None)
        else:
            z = np.array([np.mean(rows, axis=0) @ weights + p.detector_bias for _, _, rows in chunks])
            worse = z if p.detector_convention == "hallucinated" else -z
            kept = int(np.flatnonzero(worse <= worse.min() + 1e-5)[0])  # logits within 1e-5 tie; the first wins
            run.chunk_probabilities.append((1 / (1 + np.exp(-worse))).tolist())
        tokens, logprobs, _ = chunks[kept]
        run.tokens += tokens
        run.logprobs += logprobs
        if tokens[-1] in ref.eos or len(tokens) < p.chunk_tokens:
            break
    return run


# ---- AGSER (Liu et al., arXiv 2501.09997, §3) ---------------------------------------------------------------
def agser_signal(
    ref: ReferenceModel, prompt: Prompt, p: Any, max_new_tokens: int, decode: Callable[[list[int]], str],
    ask: Callable[[str], Prompt], rouge_l: Callable[[str, str], float],
) -> tuple[Run, dict[str, Any]]:
    """The request's greedy answer and AGSER's signal: per query token, the attention the last row of each forward
    gives it, summed over heads and averaged over ``p.layers``, then over the forwards kept (the prompt's own, or
    every forward of the answer); words gather their tokens (a token belongs to the word that the decoded prefix
    ending in it ends in); the top round(2/3 n) words (ties: the earlier) in order ask one question, the rest the
    other, both answered greedily (``ask`` tokenises a question in the same conversation); with the image split, a
    question's forwards hide the other part's image tokens from every row of every layer."""
    q0, q1 = prompt.query
    length = len(prompt.ids)
    image = prompt.image_positions
    forwards: list[np.ndarray] = []

    def read(layer: int, probs: torch.Tensor) -> torch.Tensor:
        if layer in p.layers:
            received = probs[:, -1].double().sum(0).numpy()[:length]  # [prompt keys]
            if layer == p.layers[0]:
                forwards.append(np.zeros(length))
            forwards[-1] += received / len(p.layers)
        return probs

    with ref.hooks(edit=read):
        run = ref.greedy(prompt, max_new_tokens)
    kept = forwards[:1] if p.attention_from == "prompt_end" else forwards[: len(run.tokens)]
    contribution = np.mean(kept, axis=0)
    ids = prompt.ids[q0:q1].tolist()
    if p.unit == "word":
        units = decode(ids).split()
        weights = np.zeros(len(units))
        for i in range(len(ids)):
            weights[min(max(len(decode(ids[: i + 1]).split()) - 1, 0), len(units) - 1)] += contribution[q0 + i]
    else:
        units, weights = ids, contribution[q0:q1]

    def halves(w: np.ndarray) -> tuple[list[int], list[int]]:
        k = min(max(int(np.floor(p.attentive_fraction * len(w) + 0.5)), 1), len(w))
        ranked = sorted(range(len(w)), key=lambda i: (-w[i], i))
        return sorted(ranked[:k]), sorted(ranked[k:])

    def text(part: list[int]) -> str:
        return " ".join(units[i] for i in part) if p.unit == "word" else decode([units[i] for i in part]).strip()

    parts = halves(weights)
    image_parts = halves(contribution[image]) if p.image == "split" else ([], [])
    answer = decode(run.tokens)
    signal: dict[str, Any] = {}
    for name, part, other_image in (("attentive", parts[0], image_parts[1]), ("non_attentive", parts[1], image_parts[0])):
        question = text(part)
        sub = ask(question)
        hidden = [sub.image_positions[i] for i in other_image]

        def hide(layer: int, scores: torch.Tensor) -> torch.Tensor:
            scores = scores.clone()
            scores[:, :, hidden] = float("-inf")
            return scores

        with ref.hooks(score_edit=hide if hidden else None):
            reply = decode(ref.greedy(sub, max_new_tokens).tokens)
        signal[f"{name}_query"], signal[f"{name}_answer"] = question, reply
        signal[f"{name}_consistency"] = rouge_l(reply, answer)
    signal["score"] = p.lam * signal["attentive_consistency"] - signal["non_attentive_consistency"]
    return run, signal


# ---- ViF (Yu et al., arXiv 2509.21789; release vif/utils/selection.py, reallocation.py) ----------------------
@dataclass
class RelayRun(Run):
    relay: list[int] = field(default_factory=list)


def vif_generate(ref: ReferenceModel, prompt: Prompt, p: Any, max_new_tokens: int) -> RelayRun:
    """Relay tokens from one unedited forward of the prompt (the last position's attention to each image token,
    mean over heads and middle layers; the top max(1, int(N * ratio)), ties to the earlier), or ``p.relay``; then
    greedy decoding with, in the middle and deep layers, on every row after the image: scores / tau, and the
    release's reallocation with the receiving keys restricted to those the row sees."""
    image = prompt.image_positions
    q0, q1 = prompt.query
    instruction = set(range(q0, q1))
    relay = p.relay
    if relay is None:
        signal = np.zeros(len(image))

        def read(layer: int, probs: torch.Tensor) -> torch.Tensor:
            if layer in p.mid_layers:
                signal[:] += probs[:, -1, image].double().mean(0).numpy() / len(p.mid_layers)
            return probs

        with ref.hooks(edit=read):
            ref.forward(prompt, [])
        k = max(1, int(len(image) * p.relay_ratio))
        relay = sorted(int(j) for j in np.argsort(-signal, kind="stable")[:k])
    relay_positions = {image[j] for j in relay}
    first = image[-1] + 1

    def temper(layer: int, scores: torch.Tensor) -> torch.Tensor:
        if layer not in p.mid_layers and layer not in p.deep_layers:
            return scores
        scores = scores.clone()
        scores[:, first:] = scores[:, first:] / p.tau
        return scores

    def move(probs: torch.Tensor, taken: list[int], receives: Callable[[int], bool], alpha: float) -> torch.Tensor:
        out = probs.clone()
        for i in range(first, probs.shape[1]):
            receivers = [j for j in range(i + 1) if receives(j)]
            for h in range(probs.shape[0]):
                a = probs[h, i].double()
                row = a.clone()
                row[taken] = a[taken] * (1 - alpha)
                if receivers:
                    row[receivers] += alpha * float(a[taken].sum()) / (len(receivers) + 1e-6)
                out[h, i] = (row / (float(row.sum()) + 1e-6)).float()
        return out

    def reallocate(layer: int, probs: torch.Tensor) -> torch.Tensor:
        if layer in p.mid_layers:  # a layer in both lists: the middle rule, then the deep one
            taken = [j for j in image if j not in relay_positions] + sorted(instruction)
            probs = move(probs, taken, lambda j: j not in taken, p.alpha_mid)
        if layer in p.deep_layers:
            probs = move(probs, list(image), lambda j: j in instruction, p.alpha_deep)
        return probs

    with ref.hooks(edit=reallocate, score_edit=temper):
        run = ref.greedy(prompt, max_new_tokens)
    return RelayRun(run.tokens, run.logprobs, relay)
