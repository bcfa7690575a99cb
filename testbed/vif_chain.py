"""Hallucination snowballing in a two-agent chain on the shapes world, with and without ViF's visual flow.

``python -m seeright.testbed.vif_chain`` runs the served model (default ``seeright/shapes-smol``) as two agents on the
scenes of a fresh seed. Agent 1 describes the image (``world.CAPTION_PROMPT``); agent 2 gets the image and agent 1's
description and answers yes/no questions: the world's POPE questions (three splits, deduplicated) and, for each object
agent 1 named that the scene lacks, "Is there a <object> in the image?". The description reaches agent 2 as
(``--flow``) ``message``: quoted in the question's turn (``MESSAGE``), so it is part of the instruction ViF's deep
layers give attention to; or ``turns``: the conversation so far, agent 1's turn as an assistant turn after the
image and the caption prompt, the question the last user turn (the instruction). Four settings:

* ``alone``: agent 2 without the message (one agent: the reference the chain is measured against);
* ``chain``: agent 2 with the message (text flow only);
* ``chain_vif_receiver``: as ``chain`` (the same message), agent 2 with ViF and agent 1's relay tokens (a visual
  flow: ``interventions.vif.relay``, the relay agent 1's prompt scores, passed on as a client would);
* ``chain_vif``: ViF in both agents (agent 1's own description under ViF, its relay passed on).

Snowballing (the paper's hallucination seeded by one agent and taken up by the next, here measured on objects): of
the absent objects agent 1 names, the share agent 2 then affirms; beside it, the share the same agent 2 affirms
without the message (``alone``), and agent 2's POPE accuracy. 95% intervals: a bootstrap over scenes; settings that
share agent 1's description are compared paired. Writes a result record (``vif-chain``) that ``seeright results
render`` shows in docs/methods.md.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from typing import Any

import numpy as np
import torch

from seeright.eval import pope
from seeright.interventions.adapters import ChatTurn
from seeright.service.engine import Engine, GenerationRequest
from seeright.testbed import world
from seeright.testbed.lookback_lens import WORDS
from seeright.tools import records

MESSAGE = 'Another agent described this image: "{description}"\n{question}'
SETTINGS = ("alone", "chain", "chain_vif_receiver", "chain_vif")


def named_objects(text: str) -> set[str]:
    """The world's objects a description names (synonyms and plurals read as CHAIR reads them)."""
    found = set()
    for word in re.findall(r"[a-z]+", text.lower()):
        name = WORDS.get(word) or WORDS.get(word.rstrip("s"))
        if name is not None:
            found.add(name)
    return found


def generate(engine: Engine, requests: list[GenerationRequest], chunk: int = 8) -> list:
    outs = []
    for start in range(0, len(requests), chunk):
        outs += engine.generate_batch(requests[start : start + chunk])
        print(f"{min(start + chunk, len(requests))}/{len(requests)}", file=sys.stderr, flush=True)
    return outs


def describe(engine: Engine, scenes: list, images: dict, vif: bool, tokens: int) -> list[tuple[str, list[int]]]:
    """Agent 1: each scene's description and the relay tokens its prompt scores (ViF's first agent)."""
    interventions = {"vif": {}}
    plain = [GenerationRequest(prompt=world.CAPTION_PROMPT, images=[images[s.image_id]], max_new_tokens=tokens,
                               interventions=interventions if vif else {}) for s in scenes]
    outs = generate(engine, plain)
    if vif:
        return [(o.text, o.diagnostics["vif"]["relay"]) for o in outs]
    # the relay depends on the prompt only (scored in an unedited prefill): one token is enough to read it
    relays = generate(engine, [GenerationRequest(prompt=world.CAPTION_PROMPT, images=[images[s.image_id]], max_new_tokens=1,
                                                 interventions=interventions) for s in scenes])
    return [(o.text, r.diagnostics["vif"]["relay"]) for o, r in zip(outs, relays)]


def questions_of(scenes: list, seed: int) -> dict[int, list[tuple[str, str]]]:
    """Each scene's POPE questions (three splits, deduplicated) with their labels."""
    by_scene: dict[int, dict[str, str]] = {s.image_id: {} for s in scenes}
    for split in pope.SPLITS:
        for q in world.pope_questions(scenes, split, random.Random(seed)):
            image_id = int(q["image"].split("_")[1].split(".")[0])
            by_scene[image_id][q["text"]] = q["label"]
    return {k: sorted(v.items()) for k, v in by_scene.items()}


def agent_2(question: str, description: str, relay: list[int], image, setting: str, flow: str, tokens: int,
            mid_layers: list[int]) -> GenerationRequest:
    """Agent 2's request for one question in one setting (with ViF: agent 1's relay tokens passed on)."""
    prompt = pope.PROMPTS["plain"].format(question=question)
    interventions = {"attention_map": {"layers": mid_layers}}  # read-only: where the answer's first token looked
    if setting.startswith("chain_vif"):
        interventions["vif"] = {"relay": relay}
    settings: dict[str, Any] = {"max_new_tokens": tokens, "images": [image], "interventions": interventions}
    if setting == "alone":
        return GenerationRequest(prompt=prompt, **settings)
    if flow == "message":
        return GenerationRequest(prompt=MESSAGE.format(description=description, question=prompt), **settings)
    turns = [ChatTurn("user", world.CAPTION_PROMPT, 1), ChatTurn("assistant", description), ChatTurn("user", prompt)]
    return GenerationRequest(turns=turns, **settings)


def answer(engine: Engine, scenes, images, descriptions, questions, setting: str, flow: str, tokens: int) -> list[dict[str, Any]]:
    """Agent 2 in one setting: per question its scene, kind (pope or seeded), label, whether it said yes, and the share
    of the last prompt token's attention (mean over heads and ViF's middle layers, after the setting's edits) on the
    image and on agent 1's relay tokens: ViF's premise is that a chain lowers them."""
    mid_layers = engine.resolve_params({"vif": {}})["vif"].mid_layers
    items, requests = [], []
    for scene, (description, relay) in zip(scenes, descriptions):
        absent = sorted(named_objects(description) - set(scene.names))
        asked = [(text, label, "pope") for text, label in questions[scene.image_id]]
        asked += [(f"Is there {world.article(o)} {o} in the image?", "no", "seeded") for o in absent]
        for text, label, kind in asked:
            requests.append(agent_2(text, description, relay, images[scene.image_id], setting, flow, tokens, mid_layers))
            items.append({"scene": scene.image_id, "kind": kind, "label": label, "relay": relay})
    for item, out in zip(items, generate(engine, requests)):
        item["yes"] = pope.parse_official(out.text) == "yes"
        first = torch.as_tensor(out.diagnostics["attention_map"]["maps"][0][0]).flatten()  # the last prompt token's row
        item["image_attention"] = float(first.sum())
        item["relay_attention"] = float(first[item.pop("relay")].sum())
    return items


def rates(items: list[dict[str, Any]]) -> dict[str, float]:
    seeded = [i["yes"] for i in items if i["kind"] == "seeded"]
    asked = [i for i in items if i["kind"] == "pope"]
    out = {"snowball": float(np.mean(seeded)) if seeded else float("nan"),
           "pope_accuracy": float(np.mean([i["yes"] == (i["label"] == "yes") for i in asked]))}
    for key in ("image_attention", "relay_attention"):
        if items and key in items[0]:
            out[key] = float(np.mean([i[key] for i in items]))
    return out


def bootstrap(settings: dict[str, list[dict]], rounds: int = 1000) -> dict[str, dict[str, float]]:
    """Per setting and metric, the 95% half-width of a bootstrap over scenes."""
    scenes = sorted({i["scene"] for items in settings.values() for i in items})
    rng = np.random.default_rng(0)
    by_scene = {name: {s: [i for i in items if i["scene"] == s] for s in scenes} for name, items in settings.items()}
    draws: dict[str, dict[str, list[float]]] = {name: {k: [] for k in rates(items)} for name, items in settings.items()}
    for _ in range(rounds):
        picked = rng.choice(scenes, size=len(scenes))
        for name in settings:
            sample = rates([i for s in picked for i in by_scene[name][s]])
            for key, value in sample.items():
                if not np.isnan(value):
                    draws[name][key].append(value)
    return {name: {key: float(np.subtract(*np.percentile(v, [97.5, 2.5]))) / 2 if v else float("nan")
                   for key, v in metrics.items()} for name, metrics in draws.items()}


def paired(a: list[dict], b: list[dict], rounds: int = 1000) -> dict[str, dict[str, float]]:
    """``b - a`` per metric on the same questions (settings that share agent 1's description), with the 95%
    half-width of a bootstrap over scenes."""
    out = {}
    scenes = sorted({i["scene"] for i in a})
    rng = np.random.default_rng(1)
    idx = {s: [k for k, i in enumerate(a) if i["scene"] == s] for s in scenes}
    point = {k: rates(b)[k] - rates(a)[k] for k in ("snowball", "pope_accuracy")}
    diffs: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(rounds):
        keep = [k for s in rng.choice(scenes, size=len(scenes)) for k in idx[s]]
        ra, rb = rates([a[k] for k in keep]), rates([b[k] for k in keep])
        for key in diffs:
            if not np.isnan(ra[key]) and not np.isnan(rb[key]):
                diffs[key].append(rb[key] - ra[key])
    for key, values in diffs.items():
        low, high = np.percentile(values, [2.5, 97.5]) if values else (float("nan"), float("nan"))
        out[key] = {"points": 100 * point[key], "interval95": 100 * float(high - low) / 2}
    return out


def run(engine: Engine, seed: int, n_images: int, flow: str = "message", caption_tokens: int = 48,
        answer_tokens: int = 10) -> dict[str, Any]:
    scenes = world.generate_scenes(n_images, seed)
    images = {s.image_id: world.render(s, seed) for s in scenes}
    questions = questions_of(scenes, seed)
    plain_descriptions = describe(engine, scenes, images, vif=False, tokens=caption_tokens)
    vif_descriptions = describe(engine, scenes, images, vif=True, tokens=caption_tokens)
    settings = {}
    for name in SETTINGS:
        descriptions = vif_descriptions if name == "chain_vif" else plain_descriptions
        settings[name] = answer(engine, scenes, images, descriptions, questions, name, flow, answer_tokens)
    # "alone" asks agent 2 the seeded questions of agent 1's plain description: the same questions as "chain"
    halves = bootstrap(settings)
    seeded = {name: sum(i["kind"] == "seeded" for i in items) for name, items in settings.items()}
    return {
        "model": engine.model_id, "seed": seed, "images": n_images, "flow": flow, "message": MESSAGE,
        "vif": engine.resolve_params({"vif": {}})["vif"].model_dump(),
        "settings": {name: {**{k: 100 * v for k, v in rates(items).items()},
                            **{f"{k}_interval95": 100 * v for k, v in halves[name].items()},
                            "seeded_questions": seeded[name],
                            "pope_questions": sum(i["kind"] == "pope" for i in items)} for name, items in settings.items()},
        "paired": {"chain_vs_alone": paired(settings["alone"], settings["chain"]),
                   "vif_receiver_vs_chain": paired(settings["chain"], settings["chain_vif_receiver"])},
        "descriptions_naming_absent": {"plain": sum(bool(named_objects(d) - set(s.names)) for s, (d, _) in zip(scenes, plain_descriptions)),
                                       "vif": sum(bool(named_objects(d) - set(s.names)) for s, (d, _) in zip(scenes, vif_descriptions))},
    }


def markdown(result: dict[str, Any]) -> str:
    titles = {"alone": "agent 2 alone (no description)", "chain": "chain: agent 1's description passed on (text only)",
              "chain_vif_receiver": "chain, ViF in agent 2 with agent 1's relay tokens",
              "chain_vif": "chain, ViF in both agents"}
    s = result["settings"]
    flow = ("agent 1's description in the question's turn" if result.get("flow", "message") == "message" else
            "agent 1's description as an assistant turn, the question the last user turn")
    lines = [
        f"`{result['model']}`, seed {result['seed']}, {result['images']} scenes, {flow}; agent 1's descriptions name an absent "
        f"object in {result['descriptions_naming_absent']['plain']} scenes ({result['descriptions_naming_absent']['vif']} "
        "under ViF). Snowballing: of the absent objects agent 1 named, the share agent 2 affirms (lower is better); 95% "
        "intervals from a bootstrap over scenes:\n",
    ]
    premise = "relay_attention" in s["alone"]
    head = "| setting | snowballing | absent objects asked | agent 2's POPE accuracy |"
    lines += [head + (" attention on the image / on the relay tokens |" if premise else ""),
              "|---|---|---|---|" + ("---|" if premise else "")]
    for name in SETTINGS:
        row = s[name]
        cells = (f"| {titles[name]} | {row['snowball']:.1f}% ±{row['snowball_interval95']:.1f} | {row['seeded_questions']} | "
                 f"{row['pope_accuracy']:.1f}% ±{row['pope_accuracy_interval95']:.1f} |")
        if premise:
            cells += (f" {row['image_attention']:.1f}% ±{row['image_attention_interval95']:.1f} / "
                      f"{row['relay_attention']:.2f}% ±{row['relay_attention_interval95']:.2f} |")
        lines.append(cells)
    if premise:
        lines += ["", "Attention: the share of the answer's first row (the last prompt token), mean over heads and ViF's "
                  "middle layers, after the setting's edits; ViF's premise is that a chain lowers it."]
    p = result["paired"]
    lines += ["", "Paired on the same questions (points, 95% interval):", "",
              "| comparison | snowballing | POPE accuracy |", "|---|---|---|"]
    for key, title in (("chain_vs_alone", "the description, against agent 2 alone"),
                       ("vif_receiver_vs_chain", "ViF in agent 2, against the plain chain")):
        cells = [f"{p[key][m]['points']:+.1f} ±{p[key][m]['interval95']:.1f}" for m in ("snowball", "pope_accuracy")]
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seeright/shapes-smol")
    parser.add_argument("--seed", type=int, default=2043, help="a seed no table, detector or tuning was made from")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--flow", choices=("message", "turns"), default="message",
                        help="how agent 2 gets the description: quoted in its question, or as the conversation's turns")
    parser.add_argument("--results", default="results", help="folder of result records")
    args = parser.parse_args()
    result = run(Engine.from_pretrained(args.model), args.seed, args.images, args.flow)
    print(markdown(result))
    suffix = "" if args.flow == "message" else f"-{args.flow}"
    records.write("vif-chain", f"{args.model.replace('/', '-')}-seed{args.seed}{suffix}", result,
                  ["python", "-m", "seeright.testbed.vif_chain", *sys.argv[1:]], args.results)


if __name__ == "__main__":
    main()
