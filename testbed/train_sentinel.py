"""Train a SENTINEL-style LoRA adapter for ``seeright/shapes-smol``: ``python -m seeright.testbed.train_sentinel``.

SENTINEL (Peng et al., "Mitigating Object Hallucinations via Sentence-Level Early Intervention", ICCV 2025, arXiv
2507.12455; release ``pspdada/SENTINEL``) trains on the model's own outputs (in-domain), at the first place a
description goes wrong (early intervention):

1. Sample the model's descriptions of training images; split each into sentences; check each sentence's objects
   (the paper cross-checks two open-vocabulary detectors; here the world's ground truth stands in for them).
2. For a context ``c`` of sentences known to be right (empty at first), sample continuations; a hallucinated next
   sentence is ``y_lose``, a right one ``y_win`` (context-coherent: the model's own continuation of ``c``); the pair
   is ``(image, question, c, y_win, y_lose)``. The context then grows by ``y_win`` and sampling goes on (the
   paper's iterative contextual bootstrapping), so pairs cover early and later positions.
3. Train LoRA with C-DPO: DPO (Rafailov et al., 2023, eq. 7) on the continuations given the shared context,
   ``-log sigmoid(beta [log pi(y_w|v,x,c)/pi_ref(y_w|v,x,c) - log pi(y_l|v,x,c)/pi_ref(y_l|v,x,c)])``, the context's
   tokens unscored; the reference is the base model (the adapter's initial state, B = 0).

Where the testbed differs: shapes-smol's captions are one sentence that lists objects ("There is a blue circle, a
red square and a green star."), so the paper's sentence is one listed object here (the tokens up to and including
the next object word); only object existence counts (a wrong colour is not an object hallucination); the
training scenes come from their own seed (never an evaluation seed). ``beta = 0.1`` is the paper's and DPO's; the
LoRA rank, learning rate and epochs are sized to a 135M model and a few hundred pairs (the paper's LLaVA-1.5 run
uses its HA-DPO code base's LoRA at 7B). Writes a PEFT adapter folder (``--out``) that ``seeright serve --adapter``
loads, with ``training.json`` (settings, pair counts, the loss and preference accuracy per epoch).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from seeright.interventions.adapters import EncodedPrompt, ModelAdapter
from seeright.service.engine import Engine, GenerationRequest
from seeright.testbed import world

WORDS = {word: name for name, words in world.SYNONYMS.items() for word in words}
LANGUAGE_MODEL = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class Pair:
    """One C-DPO example: scene, context tokens and the two continuations (token ids)."""

    scene: int
    context: list[int]
    win: list[int]
    lose: list[int]


def first_unit(tokenizer, tokens: list[int], eos: set[int]) -> tuple[list[int], str] | None:
    """The continuation's first "sentence" (its tokens through its first object word) and that object; None when
    it names no object before it ends, or stops in the middle of the word (the token budget)."""
    ended = next((t for t, token in enumerate(tokens) if token in eos), None)
    body = tokens if ended is None else tokens[:ended]
    text = tokenizer.decode(body, skip_special_tokens=True)
    for match in re.finditer(r"[a-z]+", text.lower()):
        name = WORDS.get(match.group()) or WORDS.get(match.group().rstrip("s"))
        if name is None:
            continue
        if match.end() == len(text) and ended is None:
            return None
        for t in range(len(body)):
            if len(tokenizer.decode(body[: t + 1], skip_special_tokens=True)) >= match.end():
                return body[: t + 1], name
    return None


def batch_inputs(engine: Engine, prompts: list[EncodedPrompt], tails: list[list[int]]) -> dict[str, torch.Tensor]:
    """Prompts followed by token tails, left-padded, with their images."""
    rows = [torch.cat([p.input_ids, torch.tensor(t, dtype=torch.long)]) for p, t in zip(prompts, tails)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), engine.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], mask[b, width - len(row):] = row, 1
    return {"input_ids": ids, "attention_mask": mask, **ModelAdapter.concat_images([p.images for p in prompts])}


def sample_continuations(
    engine: Engine, prompts: list[EncodedPrompt], contexts: list[list[int]], samples: int, temperature: float, tokens: int,
) -> list[list[list[int]]]:
    """``samples`` sampled continuations of each prompt + context."""
    batch = batch_inputs(engine, prompts, contexts)
    with torch.no_grad():
        out = engine.model.generate(**batch, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                                    num_return_sequences=samples, max_new_tokens=tokens,
                                    pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.eos_token_ids())
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    return [new[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def build_pairs(engine: Engine, scenes: list[world.Scene], seed: int, samples: int, rounds: int, temperature: float,
                batch: int, log) -> tuple[list[Pair], dict[str, int]]:
    """SENTINEL's data loop on the world's scenes: per round, sample continuations of each scene's context, pair a
    hallucinated next unit with the most frequent right one, and grow the context by that right one."""
    eos = set(engine.eos_token_ids())
    prompts = {s.image_id: engine.encode(GenerationRequest(prompt=world.CAPTION_PROMPT, images=[img]).chat(), [img])
               for s in scenes for img in [world.render(s, seed)]}
    contexts = {s.image_id: [] for s in scenes}
    present = {s.image_id: set(s.names) for s in scenes}
    pairs: list[Pair] = []
    counts = Counter()
    for round_ in range(rounds):
        open_ids = sorted(contexts)
        for start in range(0, len(open_ids), batch):
            chunk = open_ids[start:start + batch]
            drawn = sample_continuations(engine, [prompts[i] for i in chunk], [contexts[i] for i in chunk], samples,
                                         temperature, tokens=12)
            for image_id, continuations in zip(chunk, drawn):
                units = [u for u in (first_unit(engine.tokenizer, c, eos) for c in continuations) if u is not None]
                right = Counter(tuple(u) for u, name in units if name in present[image_id])
                wrong = list(dict.fromkeys(tuple(u) for u, name in units if name not in present[image_id]))
                counts["units"] += len(units)
                counts["hallucinated_units"] += sum(name not in present[image_id] for _, name in units)
                if not right:
                    del contexts[image_id]  # the model ends here or only hallucinates: no coherent context to grow
                    continue
                win = list(right.most_common(1)[0][0])
                pairs += [Pair(image_id, list(contexts[image_id]), win, list(lose)) for lose in wrong[:2]]
                contexts[image_id] = contexts[image_id] + win
        log(f"round {round_ + 1}: {len(pairs)} pairs, {len(contexts)} contexts still growing")
        if not contexts:
            break
    counts["pairs"] = len(pairs)
    return pairs, dict(counts)


def sequence_logps(model: torch.nn.Module, engine: Engine, prompts: list[EncodedPrompt], contexts: list[list[int]],
                   answers: list[list[int]]) -> torch.Tensor:
    """``log pi(answer | image, question, context)`` per row: the answer's tokens only (C-DPO scores no context)."""
    batch = batch_inputs(engine, prompts, [c + a for c, a in zip(contexts, answers)])
    logits = model(**batch).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    token_logps = torch.gather(F.log_softmax(logits, -1), 2, targets[..., None])[..., 0]
    scored = torch.zeros_like(token_logps, dtype=torch.bool)
    for b, answer in enumerate(answers):
        scored[b, scored.shape[1] - len(answer):] = True  # rows are left-padded: the answer is each row's end
    return (token_logps * scored).sum(1)


def c_dpo_loss(policy_win: torch.Tensor, policy_lose: torch.Tensor, ref_win: torch.Tensor, ref_lose: torch.Tensor,
               beta: float) -> torch.Tensor:
    """C-DPO: DPO's loss on continuations of a shared context (DPO eq. 7)."""
    return -F.logsigmoid(beta * ((policy_win - ref_win) - (policy_lose - ref_lose)))


def train(engine: Engine, pairs: list[Pair], prompts: dict[int, EncodedPrompt], args: argparse.Namespace, log) -> tuple[torch.nn.Module, list[dict]]:
    from peft import LoraConfig, get_peft_model  # the [train] extra

    model = get_peft_model(engine.model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                    target_modules=LANGUAGE_MODEL))
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    rows = lambda chunk: ([prompts[p.scene] for p in chunk], [p.context for p in chunk])  # noqa: E731
    with torch.no_grad():  # the reference: the adapter's initial state (B = 0) is the base model
        ref = {}
        for start in range(0, len(pairs), args.batch):
            chunk = pairs[start:start + args.batch]
            ps, cs = rows(chunk)
            win, lose = sequence_logps(model, engine, ps, cs, [p.win for p in chunk]), sequence_logps(model, engine, ps, cs, [p.lose for p in chunk])
            for i, p in enumerate(chunk):
                ref[id(p)] = (float(win[i]), float(lose[i]))
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    history = []
    model.train()
    for epoch in range(args.epochs):
        order = list(pairs)
        rng.shuffle(order)
        losses, right = [], 0
        for start in range(0, len(order), args.batch):
            chunk = order[start:start + args.batch]
            ps, cs = rows(chunk)
            win = sequence_logps(model, engine, ps, cs, [p.win for p in chunk])
            lose = sequence_logps(model, engine, ps, cs, [p.lose for p in chunk])
            ref_win = torch.tensor([ref[id(p)][0] for p in chunk])
            ref_lose = torch.tensor([ref[id(p)][1] for p in chunk])
            loss = c_dpo_loss(win, lose, ref_win, ref_lose, args.beta)
            optimizer.zero_grad()
            loss.mean().backward()
            optimizer.step()
            losses += loss.detach().tolist()
            right += int(((win - ref_win) > (lose - ref_lose)).sum())
        history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "preference_accuracy": right / len(order)})
        log(f"epoch {epoch + 1}: C-DPO loss {history[-1]['loss']:.4f}, preference accuracy {history[-1]['preference_accuracy']:.3f}")
    model.eval()
    return model, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="seeright/shapes-smol")
    parser.add_argument("--out", default="model_zoo/shapes-smol-sentinel")
    parser.add_argument("--seed", type=int, default=31, help="training scenes (never an evaluation seed)")
    parser.add_argument("--scenes", type=int, default=160)
    parser.add_argument("--samples", type=int, default=8, help="continuations sampled per context")
    parser.add_argument("--rounds", type=int, default=3, help="context growth rounds (iterative bootstrapping)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    lines: list[str] = []

    def log(message: str) -> None:
        line = f"[{time.perf_counter() - started:7.1f} s] {message}"
        lines.append(line)
        print(line, flush=True)

    engine = Engine.from_pretrained(args.model)
    scenes = world.generate_scenes(args.scenes, args.seed)
    pairs, counts = build_pairs(engine, scenes, args.seed, args.samples, args.rounds, args.temperature, args.batch, log)
    prompts = {s.image_id: engine.encode(GenerationRequest(prompt=world.CAPTION_PROMPT, images=[img]).chat(), [img])
               for s in scenes for img in [world.render(s, args.seed)]}
    model, history = train(engine, pairs, prompts, args, log)
    out = Path(args.out)
    model.save_pretrained(out)
    weights = out / "adapter_model.safetensors"  # shipped in float16 (half the bytes; served in the model's dtype)
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    (out / "README.md").unlink(missing_ok=True)  # PEFT's blank model card
    config = json.loads((out / "adapter_config.json").read_text())  # PEFT records the model's path, None for a built model
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": args.model}, indent=2))
    examples = [{**asdict(p), "text": {k: engine.tokenizer.decode(getattr(p, k)) for k in ("context", "win", "lose")}}
                for p in pairs[:5]]
    (out / "training.json").write_text(json.dumps({"settings": vars(args), "counts": counts, "history": history,
                                                   "examples": examples, "seconds": round(time.perf_counter() - started, 1)},
                                                  indent=2))
    (out / "training_log.txt").write_text("\n".join(lines) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
