"""AGSER as a hallucination detector on the shapes testbed, beside Lookback Lens and a plain baseline.

``python -m seeright.testbed.agser_eval`` runs the served model (default ``seeright/shapes-smol``) on the scenes of a
fresh seed, twice:

* captions (``world.CAPTION_PROMPT``): positive = the caption names an object the scene lacks (the world's synonym
  table, as CHAIR reads it);
* POPE questions of the three splits (plain prompt, deduplicated): positive = the answer (official parser) is wrong.

Each answer is scored by AGSER (``signals.agser``; risk = ``-score``, lower scores meaning hallucinated) for each
image variant (``whole``, ``split``), by the model's shipped Lookback Lens detector (trained on another seed, on
object mentions; a caption's risk is its highest logit over its mentions' mean ratios, as it was trained, and a
POPE answer's the mean of its tokens' P(hallucinated), each token scored alone since an answer is shorter than the
release's window of 8) and by the answer's mean token log-prob (risk = its negative). AUROC with
95% intervals from a bootstrap over scenes. AGSER needs no training; the detector's training seed is in the model's
config. Writes a result record (``agser``) that ``seeright results render`` shows in docs/methods.md.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from typing import Any

import numpy as np

from seeright.eval import pope
from seeright.service.engine import Engine, GenerationOutput, GenerationRequest
from seeright.testbed import world
from seeright.testbed.lookback_lens import WORDS, auroc, auroc_interval, mentions_of, token_spans
from seeright.tools import records

VARIANTS = ("whole", "split")
KEPT = ("attentive_query", "attentive_consistency", "non_attentive_consistency")
ASKED = re.compile(r"Is there an? (\w+) in the image\?")


def names_absent(text: str, present: set[str]) -> bool:
    """Whether a caption names an object the scene lacks (plurals read as their singular)."""
    for word in re.findall(r"[a-z]+", text.lower()):
        name = WORDS.get(word) or WORDS.get(word.rstrip("s"))
        if name is not None and name not in present:
            return True
    return False


def mention_risk(engine: Engine, out: GenerationOutput) -> float | None:
    """A caption's Lookback Lens risk as the detector was trained (``lookback_lens``): its logit on each object
    mention's mean L x H ratios, the highest over the caption's mentions; None without a mention."""
    lookback = out.diagnostics["lookback"]
    spans = token_spans(engine.tokenizer, out.token_ids)
    mentions = mentions_of(0, out.text, spans, lookback.get("features", []), set())
    if not mentions:
        return None
    weights = np.asarray(lookback["params"]["detector_weights"])
    return max(float(m.features @ weights) for m in mentions) + lookback["params"]["detector_bias"]


def token_risk(engine: Engine, out: GenerationOutput) -> float | None:
    """A short answer's Lookback Lens risk: the mean of its tokens' P(hallucinated), each token scored alone."""
    probabilities = [p for p in out.diagnostics["lookback"].get("hallucination_probability", []) if p is not None]
    return float(np.mean(probabilities)) if probabilities else None


def risks(outs: dict[str, GenerationOutput], lookback: float | None) -> dict[str, float | None]:
    """Each detector's risk for one answer (higher = more likely hallucinated); None where it has no reading."""
    base = outs[VARIANTS[0]]
    values: dict[str, float | None] = {f"agser_{v}": -outs[v].diagnostics["agser"]["score"] for v in VARIANTS}
    values["lookback"] = lookback
    values["mean_logprob"] = -float(np.mean(base.logprobs)) if base.logprobs else None
    return values


def answer(prompt: str, image: Any, max_new_tokens: int, batch: list) -> None:
    """Queue one question per variant (the first also reads Lookback Lens and the log-probs)."""
    for i, variant in enumerate(VARIANTS):
        interventions: dict[str, dict] = {"agser": {"image": variant}}
        if i == 0:
            interventions["lookback"] = {"window": 1, "features": True}
        batch.append(GenerationRequest(prompt=prompt, images=[image], interventions=interventions,
                                       max_new_tokens=max_new_tokens, logprobs=i == 0))


def run_task(engine: Engine, items: list[tuple[str, Any, int, Any]], max_new_tokens: int, lookback, label, chunk: int = 8):
    """Answer ``items`` (prompt, image, scene, truth) and score them: per item its scene, label and risks."""
    rows = []
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        batch: list[GenerationRequest] = []
        for prompt, image, _, _ in part:
            answer(prompt, image, max_new_tokens, batch)
        outs = engine.generate_batch(batch)
        for i, (_, _, scene, truth) in enumerate(part):
            by_variant = dict(zip(VARIANTS, outs[i * len(VARIANTS) : (i + 1) * len(VARIANTS)]))
            base = by_variant[VARIANTS[0]]
            rows.append({"scene": scene, "positive": label(base.text, truth), "prompt": part[i][0], "text": base.text,
                         "risks": risks(by_variant, lookback(engine, base)),
                         "agser": {v: {k: by_variant[v].diagnostics["agser"][k] for k in KEPT} for v in VARIANTS}})
        print(f"{min(start + chunk, len(items))}/{len(items)}", file=sys.stderr, flush=True)
    return rows


def preconditions(rows: list[dict]) -> dict[str, Any]:
    """What AGSER's premise looks like here: how consistent each half's answer is with the answer, on answers that are
    right and wrong, and (POPE) how often the object asked about is in the attentive query."""
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        stats = {}
        for name, wanted in (("right", False), ("wrong", True)):
            picked = [r["agser"][variant] for r in rows if r["positive"] == wanted]
            stats[name] = {k: round(float(np.mean([a[f"{k}_consistency"] for a in picked])), 4) if picked else None
                           for k in ("attentive", "non_attentive")}
        asked = [(ASKED.match(r["prompt"]), r["agser"][variant]["attentive_query"]) for r in rows]
        asked = [(m.group(1), query) for m, query in asked if m]
        if asked:
            stats["object_in_attentive_query"] = round(sum(obj in query.split() for obj, query in asked) / len(asked), 4)
        out[variant] = stats
    return out


def summary(rows: list[dict]) -> dict[str, Any]:
    """AUROC and its 95% half-width (bootstrap over scenes) per detector, on the answers it scored; AGSER's
    preconditions."""
    out: dict[str, Any] = {"answers": len(rows), "positives": int(sum(r["positive"] for r in rows)), "auroc": {},
                           "preconditions": preconditions(rows)}
    for name in rows[0]["risks"]:
        kept = [r for r in rows if r["risks"][name] is not None]
        scores = np.array([r["risks"][name] for r in kept])
        labels = np.array([r["positive"] for r in kept], dtype=int)
        groups = np.array([r["scene"] for r in kept])
        out["auroc"][name] = {"value": round(auroc(scores, labels), 4), "interval95": round(auroc_interval(scores, labels, groups), 4),
                              "scored": len(kept)}
    return out


def run(engine: Engine, seed: int, n_images: int, caption_tokens: int = 48, pope_tokens: int = 10) -> dict[str, Any]:
    scenes = world.generate_scenes(n_images, seed)
    images = {s.image_id: world.render(s, seed) for s in scenes}
    captions = [(world.CAPTION_PROMPT, images[s.image_id], s.image_id, set(s.names)) for s in scenes]
    questions: dict[tuple[str, str], tuple] = {}
    for split in pope.SPLITS:
        for q in world.pope_questions(scenes, split, random.Random(seed)):
            image_id = int(q["image"].split("_")[1].split(".")[0])
            questions.setdefault((q["image"], q["text"]), (pope.PROMPTS["plain"].format(question=q["text"]), images[image_id], image_id, q["label"]))
    caption_rows = run_task(engine, captions, caption_tokens, mention_risk, names_absent)
    pope_rows = run_task(engine, list(questions.values()), pope_tokens, token_risk, lambda text, label: pope.parse_official(text) != label)
    return {"model": engine.model_id, "seed": seed, "images": n_images,
            "captions": summary(caption_rows), "pope": summary(pope_rows)}


def markdown(result: dict[str, Any]) -> str:
    names = {"agser_whole": "AGSER, whole image in both sub-queries (zero-shot)",
             "agser_split": "AGSER, image tokens split too (zero-shot)",
             "lookback": "Lookback Lens, the model's shipped detector (trained on another seed)",
             "mean_logprob": "mean token log-prob (baseline)"}
    c, p = result["captions"], result["pope"]
    lines = [
        f"`{result['model']}`, seed {result['seed']}, {result['images']} scenes: {c['answers']} captions "
        f"({c['positives']} name an absent object), {p['answers']} POPE answers ({p['positives']} wrong). AUROC, 95% "
        "interval from a bootstrap over scenes:\n",
        "| detector | captions naming an absent object | wrong POPE answers |", "|---|---|---|",
    ]
    for key, title in names.items():
        cells = []
        for task in (c, p):
            a = task["auroc"][key]
            cells.append(f"{a['value']:.3f} ±{a['interval95']:.3f}" + ("" if a["scored"] == task["answers"] else f" ({a['scored']} scored)"))
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    lines += ["", "AGSER's premise here: mean ROUGE-L of each half's answer against the answer, on right and on wrong "
              "answers (a factual answer should come back from the attentive half and not from the other):", "",
              "| variant | task | attentive half, right / wrong answers | non-attentive half, right / wrong answers | "
              "object asked about in the attentive query |", "|---|---|---|---|---|"]
    for variant in VARIANTS:
        for task_name, task in (("captions", c), ("POPE", p)):
            pre = task["preconditions"][variant]
            cell = lambda k: " / ".join("-" if pre[n][k] is None else f"{pre[n][k]:.2f}" for n in ("right", "wrong"))  # noqa: E731
            share = f"{100 * pre['object_in_attentive_query']:.0f}%" if "object_in_attentive_query" in pre else ""
            lines.append(f"| {variant} | {task_name} | {cell('attentive')} | {cell('non_attentive')} | {share} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seeright/shapes-smol")
    parser.add_argument("--seed", type=int, default=2031, help="a seed no table or detector was made from")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--results", default="results", help="folder of result records")
    args = parser.parse_args()
    result = run(Engine.from_pretrained(args.model), args.seed, args.images)
    print(markdown(result))
    records.write("agser", f"{args.model.replace('/', '-')}-seed{args.seed}", result,
                  ["python", "-m", "seeright.testbed.agser_eval", *sys.argv[1:]], args.results)


if __name__ == "__main__":
    main()
