"""Slow, literal implementations of each method's formulas (loops, no vectorisation, float64).

The tests run the fast implementation and these on the same tensors and compare; ``seeright bench``
times them to show what the fast path gains. Nothing else uses them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


# ---- PAI ---------------------------------------------------------------------------------------------
def pai_boost(scores: torch.Tensor, image: list[int], alpha: float) -> torch.Tensor:
    """Eq. 5 on one batch row's pre-softmax scores [H, q, T]: z + alpha * |z| on image columns of the last row."""
    out = scores.double().clone()
    last = out.shape[1] - 1
    for h in range(out.shape[0]):
        for j in image:
            z = float(out[h, last, j])
            out[h, last, j] = z + alpha * abs(z)
    return out


# ---- PAINT -------------------------------------------------------------------------------------------
def paint_select(first: list[float], feature: list[float], ratio: float, iqr: float) -> tuple[list[int], list[int]]:
    """Local tokens: the top floor(ratio * N) of ``first`` minus summary tokens; summary tokens: ``feature``
    above Q3 + iqr * (Q3 - Q1), quartiles by linear interpolation between order statistics."""
    n = len(first)
    ranked = sorted(range(n), key=lambda j: (-first[j], j))
    ordered = sorted(feature)

    def quartile(q: float) -> float:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    q1, q3 = quartile(0.25), quartile(0.75)
    summary = [j for j in range(n) if feature[j] > q3 + iqr * (q3 - q1)]
    return sorted(set(ranked[: max(1, int(ratio * n))]) - set(summary)), summary


def paint_boost(scores: torch.Tensor, local: list[int], summary: list[int], alpha: float, beta: float) -> torch.Tensor:
    """z + alpha |z| on local columns, z + beta |z| on summary columns, of the last row of [H, q, T]."""
    out = scores.double().clone()
    last = out.shape[1] - 1
    for h in range(out.shape[0]):
        for columns, weight in ((local, alpha), (summary, beta)):
            for j in columns:
                z = float(out[h, last, j])
                out[h, last, j] = z + weight * abs(z)
    return out


# ---- VE masking ----------------------------------------------------------------------------------------
def vemask_uncertainty(clean: list[torch.Tensor], attacked: list[torch.Tensor]) -> list[float]:
    """Per token of one image ([CLS] first): the mean over layers of sqrt(sum_d (f'_d - f_d)^2), each divided by
    that layer's largest over the tokens (0 when no token moved), from per-layer [tokens, D] features."""
    tokens, dims = clean[0].shape
    total = [0.0] * tokens
    for f, g in zip(clean, attacked):
        norms = [math.sqrt(sum((float(g[t, d]) - float(f[t, d])) ** 2 for d in range(dims))) for t in range(tokens)]
        top = max(norms)
        for t in range(tokens):
            total[t] += norms[t] / top if top > 0 else 0.0
    return [v / len(clean) for v in total]


def vemask_select(uncertainty: list[float], k: float, ratio: float | None, include_cls: bool) -> list[int]:
    """Masked token indices ([CLS] = 0): among the candidates ([CLS] only if ``include_cls``), those with
    U >= mean + k * std (population std), or the top floor(ratio * N) (at least one, ties to the lower index)."""
    first = 0 if include_cls else 1
    candidates = list(range(first, len(uncertainty)))
    values = [uncertainty[t] for t in candidates]
    if ratio is not None:
        order = sorted(range(len(values)), key=lambda j: (-values[j], j))[: max(1, int(ratio * len(values)))]
        return sorted(candidates[j] for j in order)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [t for t, v in zip(candidates, values) if v >= mean + k * std]


# ---- Lookback Lens -------------------------------------------------------------------------------------
def lookback_ratios(row: torch.Tensor, image: list[int], first_new: int) -> list[float]:
    """Per head of one attention row [H, T]: mean over image columns / (that + mean over columns >= first_new)."""
    out = []
    for h in range(row.shape[0]):
        values = [float(v) for v in row[h]]
        a_img = sum(values[j] for j in image) / len(image)
        new = values[first_new:]
        a_new = sum(new) / len(new)
        out.append(a_img / (a_img + a_new))
    return out


def guided_choice(
    features: list[list[list[float]]], chunks: list[list[int]], weights: list[float], bias: float, convention: str,
    tie: float = 1e-5,
) -> tuple[int, list[float] | None]:
    """Lookback-guided decoding's pick among candidates: ``features[i]`` candidate i's flattened ratio rows of the
    chunk. The first candidate when all chunks are equal or one has no rows; else the one whose mean row scores
    the lowest P(hallucinated) (the detector's logit, negated for a 'factual' detector), the first of those within
    ``tie`` of the lowest.
    Returns the pick and each candidate's P(hallucinated)."""
    if all(c == chunks[0] for c in chunks) or not all(features):
        return 0, None
    probabilities, logits = [], []
    for rows in features:
        mean = [sum(row[j] for row in rows) / len(rows) for j in range(len(weights))]
        z = sum(w * x for w, x in zip(weights, mean)) + bias
        positive = 1 / (1 + math.exp(-z))
        logits.append(z)
        probabilities.append(positive if convention == "hallucinated" else 1 - positive)
    badness = [z if convention == "hallucinated" else -z for z in logits]
    lowest = min(badness)
    best = next(i for i, value in enumerate(badness) if value <= lowest + tie)
    return best, probabilities


# ---- contrast branches (VCD, RITUAL, PAI's CFG) --------------------------------------------------------
def _plausible(values: list[float], own: list[float], beta: float) -> torch.Tensor:
    """-inf where p_own(y) < beta * max p_own, computed from probabilities (softmax written out)."""
    top = max(own)
    total = sum(math.exp(v - top) for v in own)
    probs = [math.exp(v - top) / total for v in own]
    best = max(probs)
    return torch.tensor([v if p >= beta * best else float("-inf") for v, p in zip(values, probs)], dtype=torch.float64)


def vcd_contrast(scores: torch.Tensor, branch: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """VCD Eqs. 3-4 per vocabulary entry: (1 + alpha) l - alpha l', cut where p < beta * max p."""
    own, other = scores.double().tolist(), branch.double().tolist()
    return _plausible([(1 + alpha) * a - alpha * b for a, b in zip(own, other)], own, beta)


def ritual_contrast(scores: torch.Tensor, branch: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """RITUAL Eq. 3 per vocabulary entry: l + alpha l_T, cut where p < beta * max p."""
    own, other = scores.double().tolist(), branch.double().tolist()
    return _plausible([a + alpha * b for a, b in zip(own, other)], own, beta)


def cfg_contrast(scores: torch.Tensor, branch: torch.Tensor, gamma: float, cutoff: float) -> torch.Tensor:
    """PAI's CFG per vocabulary entry: gamma (s - u) + u of the log-softmaxes, cut where p < cutoff * max p."""
    def log_softmax(values: list[float]) -> list[float]:
        top = max(values)
        norm = top + math.log(sum(math.exp(v - top) for v in values))
        return [v - norm for v in values]

    own = scores.double().tolist()
    s, u = log_softmax(own), log_softmax(branch.double().tolist())
    return _plausible([gamma * (a - b) + b for a, b in zip(s, u)], own, cutoff)


# ---- VAR ---------------------------------------------------------------------------------------------
def var_sinks(hidden: torch.Tensor, dims: list[int], tau: float, pad: int) -> list[int]:
    """Step A: positions j with max_d |x_j[d]| / sqrt(mean(x_j^2) + 1e-6) > tau."""
    sinks = []
    for j in range(hidden.shape[0]):
        x = [float(v) for v in hidden[j]]
        rms = math.sqrt(sum(v * v for v in x) / len(x) + 1e-6)
        if j >= pad and max(abs(x[d]) / rms for d in dims) > tau:
            sinks.append(j)
    return sinks


def var_edit(
    probs: torch.Tensor, sinks: list[int], vis: list[int], rho: float, p: float, summ: float, first_row: int
) -> torch.Tensor:
    """Steps B and C on one batch row's probs [H, q, T]; rows before ``first_row`` are left alone."""
    A = probs.double()
    out = A.clone()
    heads, rows, _ = A.shape
    vis_sinks = [j for j in vis if j in sinks]
    free = [j for j in vis if j not in sinks]
    for h in range(heads):
        for i in range(first_row, rows):
            if not vis_sinks:
                continue
            vis_att = sum(A[h, i, j] for j in vis)
            sink_frac = sum(A[h, i, j] for j in vis_sinks) / sum(A[h, i, j] + 1e-6 for j in vis)
            free_sum = sum(A[h, i, j] for j in free)
            if not (sink_frac <= 1 - rho and vis_att >= summ and free_sum > 0):
                continue
            budget = p * sum(A[h, i, j] for j in sinks)
            for j in sinks:
                out[h, i, j] = A[h, i, j] * (1 - p)
            for j in free:
                out[h, i, j] = A[h, i, j] + budget * A[h, i, j] / free_sum
    return out


# ---- VHR ---------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    mu = sum(values) / len(values)
    return mu, math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))


def vhr_select(full: torch.Tensor, text: torch.Tensor, outlier_filter: bool) -> tuple[list[bool], list[bool]]:
    """Eq. 4, 6, 7 for one layer: (selected heads, filtered heads) from head outputs [H, d]."""
    heads = full.shape[0]
    vhd = [math.sqrt(sum((float(f) - float(t)) ** 2 for f, t in zip(full[i], text[i]))) for i in range(heads)]
    ta = [sum(float(t) ** 2 for t in text[i]) for i in range(heads)]
    mv, sv = _mean_std(vhd)
    mt, st = _mean_std(ta)
    filtered = [outlier_filter and vhd[i] > mv + sv and ta[i] > mt + st for i in range(heads)]
    vhd = [0.0 if filtered[i] else vhd[i] for i in range(heads)]
    median = sorted(vhd)[(heads - 1) // 2]  # lower median, as torch.median
    return [v > median for v in vhd], filtered


def vhr_scale(heads: torch.Tensor, chosen: list[bool], alpha: float, last_only: bool) -> torch.Tensor:
    """Scale selected heads of [q, H, d] by alpha (all positions, or the last one)."""
    out = heads.double().clone()
    positions = [heads.shape[0] - 1] if last_only else range(heads.shape[0])
    for pos in positions:
        for i, c in enumerate(chosen):
            if c:
                out[pos, i] = out[pos, i] * alpha
    return out


# ---- GIFT --------------------------------------------------------------------------------------------
def _top(values: list[float], k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


def gift_saliency(
    attentions: list[torch.Tensor], query: tuple[int, int], content: list[int], vis: list[int],
    alpha: float, fraction: float, clip: float,
) -> list[float]:
    """Saliency from per-layer attention [H, T, T] of one unpadded prompt."""
    qs, qe = query
    rows = [p - qs for p in content] or list(range(qe - qs))
    picked = []  # per layer: list over selected heads of [rows][vis]
    for A in attentions:
        A = A.double()
        heads = A.shape[0]
        shift = [[[max(float(A[h, qs + r, v] - A[h, qs + r - 1, v]), 0.0) for v in vis] for r in rows] for h in range(heads)]
        score = [sum(sum(row) for row in shift[h]) for h in range(heads)]
        picked.append([shift[h] for h in _top(score, max(1, int(fraction * heads)))])
    n = sum(len(layer) for layer in picked) * len(rows)
    s = [sum(h[r][v] for layer in picked for h in layer for r in range(len(rows))) / n for v in range(len(vis))]
    mu, sd = _mean_std(s)
    s = [min(max(x, mu - clip * sd), mu + clip * sd) for x in s]
    lo, hi = min(s), max(s)
    return [math.exp((x - lo) / (hi - lo) * alpha) if hi > lo else 1.0 for x in s]


def gift_edit_row(
    row: torch.Tensor, vis: list[int], query: list[int], sal: list[float], fraction: float
) -> torch.Tensor:
    """Enhancement of one last attention row [H, T]."""
    A = row.double()
    heads = A.shape[0]
    k = max(1, int(fraction * heads))
    hv = _top([sum(float(A[h, v]) for v in vis) for h in range(heads)], k)
    ratio = sum(float(A[h, v]) * s for h in hv for v, s in zip(vis, sal)) / sum(float(A[h, v]) for h in hv for v in vis)
    hq = _top([sum(float(A[h, j]) for j in query) for h in range(heads)], k)
    out = A.clone()
    for h in hv:
        for v, s in zip(vis, sal):
            out[h, v] = out[h, v] * s
    for h in hq:
        for j in query:
            out[h, j] = out[h, j] * ratio
    for h in range(heads):
        out[h] = out[h] / out[h].sum()
    return out


# ---- CARVE -------------------------------------------------------------------------------------------
def carve_collect_uncached(model, inputs: dict, vis: list[int], layers: list[int], steps: int, eos: set[int]):
    """The release's loop: a full forward without cache per step, attention from every layer."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    maps = []
    for _ in range(steps):
        kwargs = dict(extra)
        if "mm_token_type_ids" in inputs:
            pad = ids.shape[1] - inputs["mm_token_type_ids"].shape[1]
            kwargs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros((1, pad), dtype=inputs["mm_token_type_ids"].dtype)], 1
            )
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False, **kwargs)
        maps.append(torch.stack([out.attentions[l][0, :, -1, vis].mean(0) for l in layers]))
        token = int(out.logits[0, -1].argmax())
        if token in eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
        mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], 1)
    return maps


def carve_fuse(task, general, grid, size, lam: float, all_steps: bool) -> np.ndarray:
    """S = sum_t w_t sum_l resize(a^Q / (a^G + lam)), loop form."""
    width, height = size
    S = np.zeros((height, width))
    steps = range(min(len(task), len(general))) if all_steps else [0]
    for t in steps:
        w = t + 1 if all_steps else 1.0
        for l in range(task[t].shape[0]):
            c = [float(q) / (float(g) + lam) for q, g in zip(task[t][l], general[t][l])]
            arr = np.array(c, dtype=np.float32).reshape(grid)
            S += w * np.asarray(Image.fromarray(arr).resize((width, height), Image.BILINEAR), dtype=np.float32)
    return S


def carve_mask(S: np.ndarray, top_p: float, min_regions: int, fraction: float) -> np.ndarray:
    """Threshold at the percentile, label 4-connected regions by flood fill, keep the best regions."""
    thr = np.percentile(S, (1 - top_p) * 100)
    h, w = S.shape
    on = [[S[y, x] >= thr for x in range(w)] for y in range(h)]
    label = [[0] * w for _ in range(h)]
    regions = []
    for y in range(h):
        for x in range(w):
            if on[y][x] and not label[y][x]:
                regions.append([])
                stack = [(y, x)]
                label[y][x] = len(regions)
                while stack:
                    cy, cx = stack.pop()
                    regions[-1].append((cy, cx))
                    for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                        if 0 <= ny < h and 0 <= nx < w and on[ny][nx] and not label[ny][nx]:
                            label[ny][nx] = len(regions)
                            stack.append((ny, nx))
    scores = [sum(S[y, x] for y, x in r) for r in regions]
    keep = sorted(range(len(regions)), key=lambda i: -scores[i])[: max(min_regions, int(len(regions) * fraction))]
    mask = np.zeros((h, w), dtype=np.uint8)
    for i in keep:
        for y, x in regions[i]:
            mask[y, x] = 1
    return mask


# ---- ViF ---------------------------------------------------------------------------------------------
def vif_relay(signal: list[float], ratio: float) -> list[int]:
    """The top max(1, int(N * ratio)) image tokens by signal, ties to the earlier, in token order."""
    k = max(1, int(len(signal) * ratio))
    return sorted(sorted(range(len(signal)), key=lambda j: (-signal[j], j))[:k])


def vif_reallocate(probs: torch.Tensor, first_row: int, pad: int, taken: set[int], receives, alpha: float) -> torch.Tensor:
    """One batch row's probs [H, q, T] (queries at the last q positions): on rows from ``first_row``, each head's
    attention on ``taken`` keys loses alpha of itself and the total lost goes in equal parts to the keys j the row
    sees (pad <= j <= its position) with ``receives(j)``; then A / (sum A + 1e-6), the release's formula."""
    A = probs.double()
    out = A.clone()
    heads, rows, total = A.shape
    for i in range(first_row, rows):
        position = total - rows + i
        given = [j for j in range(pad, position + 1) if receives(j)]
        for h in range(heads):
            lost = alpha * sum(float(A[h, i, j]) for j in taken)
            row = [float(A[h, i, j]) for j in range(total)]
            for j in taken:
                row[j] -= alpha * float(A[h, i, j])
            for j in given:
                row[j] += lost / (len(given) + 1e-6)
            norm = sum(row) + 1e-6
            for j in range(total):
                out[h, i, j] = row[j] / norm
    return out
