"""A Lookback Lens detector on the shapes testbed: object mentions in captions, hallucinated or not.

``python -m seeright.testbed.lookback_lens --out DIR`` captions the scenes of a training seed with the served model's
``lookback`` signal (per-token L x H lookback ratios, ``seeright.interventions.methods.lookback``), labels each object
mention by the scene's ground truth (1 = hallucinated: the object is not in the scene; the world's synonym
table maps words to objects, as CHAIR does), and fits the release's detector (``step03_lookback_lens.py``:
logistic regression, L2 with C = 1, on the mean ratios over the mention's tokens, flattened to L*H values).
It reports the AUROC on the mentions of a fresh seed's captions, with a 95% interval from a bootstrap over
captions, and writes the detector (``NAME.json``) and the report (``NAME.md``; ``--name``, default
``lookback-lens``).

A mention's features are the ratios of the query rows of its own tokens (the release reads the attention
row at each span position); the caption's last token has none (generation stopped there) and a mention
without any row is dropped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seeright.service.engine import Engine, GenerationRequest
from seeright.testbed import world
from seeright.tools import records

WORDS = {word: name for name, words in world.SYNONYMS.items() for word in words}


@dataclass
class Mention:
    caption: int
    word: str
    features: np.ndarray  # [L * H]
    hallucinated: bool


def token_spans(tokenizer: Any, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each generated token in the decoded caption."""
    ends = [len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True)) for t in range(len(ids))]
    return list(zip([0, *ends[:-1]], ends))


def mentions_of(caption: int, text: str, spans: list[tuple[int, int]], features: list, present: set[str]) -> list[Mention]:
    """Object words of one caption with the mean ratios of their tokens' query rows."""
    found = []
    for match in re.finditer(r"[a-z]+", text.lower()):
        word = match.group()
        name = WORDS.get(word) or WORDS.get(word.rstrip("s"))
        if name is None:
            continue
        rows = [t for t, (a, b) in enumerate(spans) if a < match.end() and b > match.start() and t < len(features)]
        if rows:
            matrix = np.mean([np.asarray(features[t], dtype=np.float64) for t in rows], axis=0)
            found.append(Mention(caption, word, matrix.ravel(), name not in present))
    return found


def collect(engine: Engine, seed: int, n_images: int, max_new_tokens: int = 48, batch: int = 32) -> list[Mention]:
    """Caption ``n_images`` scenes of ``seed`` with the lookback signal and label their object mentions."""
    scenes = world.generate_scenes(n_images, seed)
    out: list[Mention] = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        requests = [GenerationRequest(prompt=world.CAPTION_PROMPT, images=[world.render(s, seed)], max_new_tokens=max_new_tokens,
                                      interventions={"lookback": {"features": True}}) for s in chunk]
        for i, (scene, result) in enumerate(zip(chunk, engine.generate_batch(requests))):
            spans = token_spans(engine.tokenizer, result.token_ids)
            features = result.diagnostics["lookback"].get("features", [])
            out += mentions_of(start + i, result.text, spans, features, set(scene.names))
    return out


def fit(x: np.ndarray, y: np.ndarray, c: float = 1.0, max_iter: int = 1000) -> tuple[np.ndarray, float]:
    """sklearn's default LogisticRegression: minimise 0.5 |w|^2 + C * sum log-loss (the bias unpenalised)."""
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = 0.5 * w.pow(2).sum() + c * torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, reduction="sum")
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    return w.detach().numpy(), float(b.detach())


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count half): the Mann-Whitney statistic."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def auroc_interval(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, rounds: int = 1000) -> float:
    """95% half-width of the AUROC from a bootstrap over captions (a caption's mentions move together)."""
    ids = np.unique(groups)
    members = {g: np.nonzero(groups == g)[0] for g in ids}
    rng = np.random.default_rng(0)
    values = []
    for _ in range(rounds):
        picked = np.concatenate([members[g] for g in rng.choice(ids, size=len(ids))])
        value = auroc(scores[picked], labels[picked])
        if not np.isnan(value):
            values.append(value)
    if not values:  # one class only: no AUROC to bound
        return float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(high - low) / 2


def run(engine: Engine, train_seed: int, test_seed: int, n_images: int) -> dict[str, Any]:
    train, test = collect(engine, train_seed, n_images), collect(engine, test_seed, n_images)
    x, y = np.stack([m.features for m in train]), np.array([m.hallucinated for m in train], dtype=float)
    w, b = fit(x, y)
    xt, yt = np.stack([m.features for m in test]), np.array([m.hallucinated for m in test], dtype=float)
    scores = xt @ w + b
    mean_ratio = -xt.mean(1)  # the single feature a detector-free reading would use: less looking back, more risk
    groups = np.array([m.caption for m in test])
    return {
        "model": engine.model_id, "train": {"seed": train_seed, "images": n_images, "mentions": len(train),
                                             "hallucinated": int(y.sum())},
        "test": {"seed": test_seed, "images": n_images, "mentions": len(test), "hallucinated": int(yt.sum())},
        "auroc": round(auroc(scores, yt), 4), "auroc_interval95": round(auroc_interval(scores, yt, groups), 4),
        "mean_ratio_auroc": round(auroc(mean_ratio, yt), 4),
        "mean_ratio_auroc_interval95": round(auroc_interval(mean_ratio, yt, groups), 4),
        "detector": {"weights": w.round(6).tolist(), "bias": round(b, 6), "convention": "hallucinated",
                     "layers": engine.info.num_layers,
                     "heads": engine.info.num_heads, "positive": "hallucinated object mention",
                     "features": "mean lookback ratio over the mention's tokens' query rows, [layer][head] flattened"},
    }


def markdown(result: dict[str, Any]) -> str:
    tr, te = result["train"], result["test"]
    return (
        f"Lookback Lens on `{result['model']}`: trained on seed {tr['seed']} ({tr['images']} captions, {tr['mentions']} "
        f"object mentions, {tr['hallucinated']} hallucinated), tested on seed {te['seed']} ({te['images']} captions, "
        f"{te['mentions']} mentions, {te['hallucinated']} hallucinated).\n\n"
        "| detector | AUROC (fresh seed) | 95% interval (bootstrap over captions) |\n|---|---|---|\n"
        f"| logistic regression on L x H lookback ratios | {result['auroc']:.3f} | ±{result['auroc_interval95']:.3f} |\n"
        f"| mean lookback ratio alone (lower = riskier) | {result['mean_ratio_auroc']:.3f} | "
        f"±{result['mean_ratio_auroc_interval95']:.3f} |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seeright/shapes-llava")
    parser.add_argument("--train-seed", type=int, default=2024)
    parser.add_argument("--test-seed", type=int, default=4242)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", default="lookback-lens", help="file stem of the detector and report in DIR")
    parser.add_argument("--results", default="results", help="folder of result records")
    args = parser.parse_args()
    result = run(Engine.from_pretrained(args.model), args.train_seed, args.test_seed, args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    records.write("lookback-lens", args.name, result, ["python", "-m", "seeright.testbed.lookback_lens", *sys.argv[1:]], args.results)


if __name__ == "__main__":
    main()
