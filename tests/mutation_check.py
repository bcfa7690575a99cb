"""Mutation check of the independent references: swap a convention in the fast path, run the reference
tests, restore the file. Every mutation must make some reference test fail.

    python tests/mutation_check.py          # about 12 s per mutation on 2 cores
    python tests/mutation_check.py VHR      # only the mutations whose label contains one of these words

Not collected by pytest (it edits source files while it runs; run it alone).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
M = "interventions/methods/"
MUTATIONS = [
    ("PAI boost z * (1 + alpha) instead of z + alpha |z|", M + "pai.py", "last + weight[:, None, :] * last.abs()",
     "last + weight[:, None, :] * last"),
    ("PAI boosts every column, not the image's", M + "pai.py", 'row_masks(states, total, device, "image") * per_row',
     'torch.ones(len(states), total, device=device) * per_row'),
    ("PAI CFG mixes back s instead of u", M + "pai.py", "state.params.gamma * (s - u) + u", "state.params.gamma * (s - u) + s"),
    ("PAINT local tokens keep the summary ones", M + "paint.py", "return local & ~summary, summary", "return local, summary"),
    ("PAINT alpha and beta swapped", M + "paint.py",
     "local.float() * state.params.alpha + summary.float() * state.params.beta",
     "local.float() * state.params.beta + summary.float() * state.params.alpha"),
    ("VCD contrast without the (1 + alpha) weight", M + "vcd.py", "(1 + p.alpha) * scores - p.alpha * branch",
     "scores - p.alpha * branch"),
    ("VCD noise weights swapped", M + "vcd.py", "noised = abar.sqrt() * pixels.double().cpu() + (1 - abar).sqrt()",
     "noised = (1 - abar).sqrt() * pixels.double().cpu() + abar.sqrt()"),
    ("RITUAL cutoff on the combined scores", M + "ritual.py", "plausible(scores + p.alpha * branch, scores, p.beta)",
     "plausible(scores + p.alpha * branch, scores + p.alpha * branch, p.beta)"),
    ("VE masking's PGD descends instead of ascending", M + "vemask.py", "delta.detach() + p.step_size * grad.sign()",
     "delta.detach() - p.step_size * grad.sign()"),
    ("VE masking keeps the least uncertain tokens", M + "vemask.py", "chosen = scores >= bar", "chosen = scores <= bar"),
    ("VE masking on keys instead of attention outputs", M + "vemask.py", "VisionMask(p.mask_target, keep)",
     'VisionMask("keys", keep)'),
    ("VE masking's map as MSE, not max-normalised L2", M + "vemask.py", "norm = (attacked[l] - clean[l]).norm(dim=-1)",
     "norm = ((attacked[l] - clean[l]) ** 2).mean(-1)"),
    ("VE masking's threshold with the sample std", M + "vemask.py", "scores.std(-1, correction=0, keepdim=True)",
     "scores.std(-1, keepdim=True)"),
    ("VE masking never masks [CLS]", M + "vemask.py", "first = 0 if p.include_cls else 1", "first = 1"),
    ("Guided decoding keeps the candidate the detector trusts least", M + "lookback_decoding.py",
     'z = z if p.detector_convention == "hallucinated" else -z', 'z = -z if p.detector_convention == "hallucinated" else z'),
    ("Guided decoding reads a release (factual) detector as P(hallucinated)", M + "lookback_decoding.py",
     'z = z if p.detector_convention == "hallucinated" else -z', "z = z"),
    ("Guided decoding scores the chunk's last token, not its mean", M + "lookback_decoding.py",
     'torch.stack(s.data["rows"][:n]).float().mean(0)', 'torch.stack(s.data["rows"][:n][-1:]).float().mean(0)'),
    ("VAR rho convention swapped", M + "var.py", "selected = (sink_frac <= 1 - rho)", "selected = (sink_frac <= rho)"),
    ("VAR p convention swapped (sinks keep p)", M + "var.py", "lambda: 1 - p[:, 0] * masks[:, :, 2], 1.0)",
     "lambda: p[:, 0] * masks[:, :, 2] + (1 - masks[:, :, 2]), 1.0)"),
    ("VHR head selection off by one (>= median)", M + "vhr.py", "return vhd > vhd.median(", "return vhd >= vhd.median("),
    ("VHR prefill_positions=last ignored", M + "vhr.py",
     "factor = torch.where(keep[:, :, None, None], torch.ones_like(factor), factor)", "pass"),
    ("VHR outlier_filter=false ignored", M + "vhr.py", "outlier &= outlier_filter[:, None]", "pass"),
    ("GIFT gaze rows shifted by one", M + "gift.py", "attn = probs[row, :, start - 1 - q0 : end - q0]",
     "attn = probs[row, :, start - q0 : end + 1 - q0]"),
    ("GIFT top heads off by one", M + "gift.py", "k = (fraction * heads).floor().clamp_min(1)",
     "k = (fraction * heads).floor().clamp_min(1) + 1"),
    ("GIFT content_words ignored", M + "gift.py", 'content = [] if state.params.content_words == "all" else',
     "content = [] if True else"),
    ("CARVE step weight t instead of t + 1", M + "carve.py", 'weight = t + 1 if params.steps == "all"',
     'weight = t if params.steps == "all"'),
    ("CARVE steps=first ignored", M + "carve.py", 'steps = [0] if params.steps == "first" else range(',
     "steps = range("),
    ("CARVE requery=refined ignored", M + "carve.py",
     'images = [image, refined] if state.params.requery == "original_and_refined" else [refined]',
     "images = [image, refined]"),
    ("Lookback convention inverted (a release classifier read as P(hallucinated))", M + "lookback.py",
     'return 1 - positive if p.detector_convention == "factual" else positive', "return positive"),
    ("RITUAL crop resized to the original size (LLaVA's processor then cuts its edges)",
     "interventions/image_transforms.py", "size = (square, square) if square else image.size", "size = image.size"),
    ("Lookback scores one token, not the sliding window", M + "lookback.py",
     "positive = torch.sigmoid(torch.stack(window).mean(0) @ weights", "positive = torch.sigmoid(window[-1] @ weights"),
    ("ViF relay: the weakest tokens, not the strongest", M + "vif.py", "torch.sort(signal, descending=True, stable=True)",
     "torch.sort(signal, descending=False, stable=True)"),
    ("ViF middle layers take from the relay tokens too", M + "vif.py", "taken = (vision & ~relay) | instruction",
     "taken = vision | instruction"),
    ("ViF gives to every key, seen or not (the release's R)", M + "vif.py", "seen & ~taken[:, None, :]",
     "~taken[:, None, :].expand_as(seen)"),
    ("ViF temperature multiplies instead of dividing", M + "vif.py", "scores / tau, scores)", "scores * tau, scores)"),
    ("ViF middle layers move alpha_deep", M + "vif.py", 'per_row(states, "alpha_mid", device)',
     'per_row(states, "alpha_deep", device)'),
]


def run_references() -> str:
    out = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "tests/test_independent_references.py"],
                         cwd=ROOT, capture_output=True, text=True).stdout
    found = re.findall(r"\d+ (?:failed|passed)[^\n]*", out)
    return found[-1] if found else out[-300:]


def main(only: list[str]) -> int:
    missed = []
    for label, rel, old, new in MUTATIONS:
        if only and not any(word in label for word in only):
            continue
        path = ROOT / rel
        original = path.read_text()
        if old not in original:
            print(f"{label}: the code to mutate is gone; update this list")
            missed.append(label)
            continue
        try:
            path.write_text(original.replace(old, new, 1))
            summary = run_references()
        finally:
            path.write_text(original)
        print(f"{label}: {summary}")
        if "failed" not in summary:
            missed.append(label)
    print("every mutation caught" if not missed else f"not caught: {missed}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
