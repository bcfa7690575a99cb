"""Train ``seeright/shapes-smol``: SmolLM2-135M-Instruct (frozen, with LoRA) seeing the shapes world, on a CPU.

``python -m seeright.testbed.train_smol`` writes ``model_zoo/shapes-smol`` (what was trained, a few MB) and its log.
``model_zoo/shapes_smol.py`` rebuilds the model from that and the GGUF language model at load time. Stages:

1. Vision: the tower starts from ``seeright/shapes-llava``'s (trained on which objects cover each patch) and
   learns, per patch, which objects and which colours cover it (multi-label), plus the objects present.
2. Projector warm start: the MLP projector starts as that per-patch classifier followed by SmolLM2's word
   embeddings of the object and colour names (a background patch maps to the embedding of " background"), so an
   image token starts out as the words of what it shows.
3. Language: the language model stays frozen but for rank-``lora_rank`` updates of its attention's q and v
   projections; they, the projector and the tower (at a tenth of the rate) learn yes/no questions about objects
   and coloured objects (half of them with lmms-eval's "Answer the question using a single word or phrase."),
   and, from ``captions_from`` on, captions. Only the answer tokens and ``<|im_end|>`` are supervised. Prompts
   are the serving adapter's own (SmolLM2's chat template with its default system message).
4. Chat kept by self-distillation: each step also holds ``chat_rows`` text-only prompts
   (``testbed/chat_prompts.py``) answered by the base model itself (greedy, before any LoRA), with their own
   mean loss, so the adapters learn the image without rewriting what SmolLM2 says without one.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration

from seeright.interventions.adapters.base import ChatTurn
from seeright.interventions.adapters.llava import chatml_segments, default_system
from seeright.model_zoo import resolve_model_path
from seeright.model_zoo.shapes_smol import IMAGE_TOKEN, TRAINED, assemble, language_model
from seeright.testbed import chat_prompts
from seeright.testbed import world as shapes
from seeright.testbed.train import COVER, World, answer_accuracy, patch_cover, right_padded

LMMS_SUFFIX = " Answer the question using a single word or phrase."
CLASSES = len(shapes.OBJECTS) + len(shapes.COLORS)


class LoRA(torch.nn.Module):
    """Low-rank updates ``scale * B A x`` added to the outputs of linear layers through forward hooks."""

    def __init__(self, modules: dict[str, torch.nn.Linear], rank: int, alpha: float, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.names = list(modules)
        self.scale = alpha / rank
        self.A = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(rank, m.in_features, generator=generator) / m.in_features ** 0.5) for m in modules.values()
        )
        self.B = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(m.out_features, rank)) for m in modules.values())
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules.values())]

    def _hook(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + self.scale * (args[0] @ self.A[i].T) @ self.B[i].T
        return hook

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, a, b in zip(self.names, self.A, self.B):
            a.copy_(state[f"{name}.lora_A"])
            b.copy_(state[f"{name}.lora_B"])

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, a, b in zip(self.names, self.A, self.B):
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a.detach().clone(), b.detach().clone()
        return out


def prompt_text(tokenizer, question: str, image_tokens: int, images: int = 1) -> str:
    segments = chatml_segments([ChatTurn("user", question, images)], IMAGE_TOKEN, default_system(tokenizer.chat_template))
    return "".join(s.text.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens) if s.kind == "image" else s.text for s in segments)


def answer_rows(tokenizer, prompts: list[str], answers: list[str], image_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of prompt + answer + ``<|im_end|>``, and labels on the answer and ``<|im_end|>`` only."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, labels = [], []
    for prompt, answer in zip(prompts, answers):
        head = tokenizer(prompt_text(tokenizer, prompt, image_tokens), add_special_tokens=False)["input_ids"]
        tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end] if answer else []
        ids.append(head + tail)
        labels.append([-100] * len(head) + tail)
    return ids, labels


def encode_batch(tokenizer, prompts: list[str], answers: list[str], image_tokens: int) -> dict[str, torch.Tensor]:
    """Right-padded :func:`answer_rows`."""
    return right_padded(*answer_rows(tokenizer, prompts, answers, image_tokens), tokenizer.pad_token_id)


def chat_prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Text-only prompts in the serving adapter's format (no image)."""
    return [tokenizer(prompt_text(tokenizer, p, 0, images=0), add_special_tokens=False)["input_ids"] for p in prompts]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch: int = 16) -> list[list[int]]:
    """Each text-only prompt's greedy answer tokens, through ``<|im_end|>`` when it ends within ``max_new_tokens``."""
    end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    answers = []
    rows = chat_prompt_ids(tokenizer, prompts)
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk])  # left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=end, pad_token_id=pad)[:, width:].tolist()
        answers += [a[:a.index(end) + 1] if end in a else a for a in out]
    model.train(was_training)
    return answers


def chat_rows(tokenizer, prompts: Sequence[str], answers: Sequence[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Self-distilled chat rows: each prompt followed by the base model's own answer tokens, loss on the answer."""
    heads = chat_prompt_ids(tokenizer, prompts)
    return [h + a for h, a in zip(heads, answers)], [[-100] * len(h) + a for h, a in zip(heads, answers)]


def group_loss(logits: torch.Tensor, labels: torch.Tensor, rows: slice) -> torch.Tensor:
    """Next-token cross-entropy averaged over the supervised tokens of ``rows``."""
    return F.cross_entropy(logits[rows, :-1].flatten(0, 1), labels[rows, 1:].flatten(), ignore_index=-100)


def question(world: World, scene: shapes.Scene, colour_share: float) -> tuple[str, str]:
    """A yes/no question about an object, or (``colour_share``) about a coloured object, half with lmms-eval's suffix."""
    rng = world.rng
    if rng.random() < colour_share:
        present = {(o.color, o.name) for o in scene.objects}
        if rng.random() < 0.5:
            colour, name = rng.choice(sorted(present))
            answer = "Yes"
        else:
            colour, name = rng.choice([(c, n) for c in shapes.COLORS for n in shapes.OBJECTS if (c, n) not in present])
            answer = "No"
        q = f"Is there {shapes.article(colour)} {colour} {name} in the image?"
    else:
        q, answer = world.question(scene)
    return q + (LMMS_SUFFIX if rng.random() < 0.5 else ""), answer


def pretrain_vision(model, world: World, steps: int, batch: int, lr: float, log) -> torch.nn.Linear:
    tower = model.model.vision_tower
    patch = tower.config.patch_size
    patch_head = torch.nn.Linear(tower.config.hidden_size, CLASSES)
    scene_head = torch.nn.Linear(tower.config.hidden_size, len(shapes.OBJECTS))
    params = list(tower.parameters()) + list(patch_head.parameters()) + list(scene_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for step in range(steps):
        scenes = world.scenes(batch)
        present = torch.tensor([[float(o in s.names) for o in shapes.OBJECTS] for s in scenes])
        covered = torch.stack([torch.cat([patch_cover(s, patch), patch_cover(s, patch, "color", tuple(shapes.COLORS))], -1)
                               for s in scenes]) > COVER
        feats = tower(world.pixels(scenes)).last_hidden_state[:, 1:]
        logits = patch_head(feats)
        loss = F.binary_cross_entropy_with_logits(logits, covered.float())
        loss = loss + F.binary_cross_entropy_with_logits(scene_head(feats.mean(1)), present)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            acc = ((logits > 0) == covered).float().mean().item()
            log(f"vision step {step} loss {loss.item():.4f} per-patch label acc {acc:.3f}")
    return patch_head


def word_embedding(model, tokenizer, word: str) -> torch.Tensor:
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight[ids].mean(0)


@torch.no_grad()
def warm_start_projector(model, patch_head: torch.nn.Linear, tokenizer) -> None:
    proj = model.model.multi_modal_projector
    words = torch.stack([word_embedding(model, tokenizer, w) for w in [*shapes.OBJECTS, *shapes.COLORS]])
    proj.linear_1.weight.zero_()
    proj.linear_1.bias.zero_()
    proj.linear_1.weight[:CLASSES] = patch_head.weight / 4
    proj.linear_1.bias[:CLASSES] = patch_head.bias / 4
    proj.linear_2.weight.zero_()
    proj.linear_2.weight[:, :CLASSES] = words.T
    proj.linear_2.bias.copy_(word_embedding(model, tokenizer, "background"))


@torch.no_grad()
def yes_no_accuracy(model, tokenizer, world: World, image_tokens: int, suffix: str, n: int = 64) -> float:
    """Held-out accuracy of the first answer token (Yes vs No) on object questions ending in ``suffix``."""
    def encode(questions: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = encode_batch(tokenizer, [q + suffix for q in questions], ["" for _ in questions], image_tokens)
        return inputs, inputs["attention_mask"].sum(1) - 1  # the prompt's last token predicts the answer

    return answer_accuracy(model, tokenizer, world, encode, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="model_zoo/shapes-smol")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=1500)
    parser.add_argument("--language-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="projector and LoRA (the tower: a tenth)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--colour-share", type=float, default=0.3)
    parser.add_argument("--caption-share", type=float, default=0.3)
    parser.add_argument("--captions-from", type=float, default=0.4)
    parser.add_argument("--chat-rows", type=int, default=4,
                        help="self-distilled text-only chat rows per step (0: none, as in the first two runs)")
    parser.add_argument("--chat-tokens", type=int, default=48, help="longest distilled answer, in tokens")
    parser.add_argument("--chat-weight", type=float, default=1.0, help="weight of the chat rows' mean loss")
    parser.add_argument("--minutes", type=float, default=80, help="stop the language stage after this much wall time")
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue the language stage from a saved model folder (no vision stage; its log is extended)")
    args = parser.parse_args()
    start = time.time()
    lines: list[str] = []

    def chat_kept() -> float:
        """Share of held-out chat prompts whose greedy answer is still the base model's."""
        now = greedy_answers(model, tokenizer, chat_prompts.HELD_OUT, args.chat_tokens)
        return sum(a == base_answers[p] for p, a in zip(chat_prompts.HELD_OUT, now)) / len(now)

    def log(msg: str) -> None:
        line = f"[{time.time() - start:7.1f}s] {msg}"
        print(line, flush=True)
        lines.append(line)

    if args.resume is not None:
        lines.extend((args.resume / "training_log.txt").read_text().splitlines())
        lines.append(f"--- resumed from {args.resume} ---")
    log(f"arguments: {json.dumps(vars(args), default=str)}")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    shapes_llava = Path(resolve_model_path("seeright/shapes-llava"))
    processor = CLIPImageProcessorPil.from_pretrained(shapes_llava)
    base = LlavaForConditionalGeneration.from_pretrained(shapes_llava)
    vision = base.config.vision_config.to_dict()
    lm, tokenizer = language_model()
    model = assemble(vision, lm, tokenizer)
    model.model.vision_tower.load_state_dict(base.model.vision_tower.state_dict())
    del base, lm
    log(f"assembled: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    world = World(args.seed, processor)
    tokens = (shapes.SIZE // vision["patch_size"]) ** 2

    if args.resume is None:
        patch_head = pretrain_vision(model, world, args.vision_steps, 32, 3e-4, log)
        warm_start_projector(model, patch_head, tokenizer)
        resumed: dict[str, torch.Tensor] = {}
    else:
        resumed = load_file(args.resume / TRAINED)
        unexpected = model.load_state_dict({k: v for k, v in resumed.items() if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}, strict=False).unexpected_keys
        assert not unexpected, f"{args.resume / TRAINED} has weights this model lacks: {unexpected[:3]}"
        with torch.no_grad():
            model.get_input_embeddings().weight[model.config.image_token_id] = resumed["image_token_embedding"]
    base_answers: dict[str, list[int]] = {}
    if args.chat_rows:  # the base model's answers: no LoRA yet, and no image in these prompts
        prompts = (*chat_prompts.TRAIN, *chat_prompts.HELD_OUT)
        base_answers = dict(zip(prompts, greedy_answers(model, tokenizer, prompts, args.chat_tokens)))
        log(f"distilled {len(prompts)} base-model answers; held out: {tokenizer.decode(base_answers[chat_prompts.HELD_OUT[0]])!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.language_model.layers
    targets = {f"model.language_model.layers.{i}.self_attn.{proj}": getattr(layer.self_attn, proj)
               for i, layer in enumerate(layers) for proj in ("q_proj", "v_proj")}
    lora = LoRA(targets, args.lora_rank, args.lora_alpha, args.seed)
    if resumed:
        lora.load(resumed)
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    for p in [*tower.parameters(), *projector.parameters()]:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([
        {"params": [*projector.parameters(), *lora.parameters()], "lr": args.lr},
        {"params": list(tower.parameters()), "lr": args.lr / 10},
    ], weight_decay=0.0)
    steps = args.language_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * max(0.1, 1 - s / steps))
    evaluate = World(args.seed + 1, processor)
    log(f"before language training: yes/no acc {yes_no_accuracy(model, tokenizer, evaluate, tokens, ''):.3f}")
    model.train()
    stop_at = start + args.minutes * 60
    for step in range(steps):
        scenes = world.scenes(args.batch)
        prompts, answers = [], []
        for scene in scenes:
            if step >= args.captions_from * steps and world.rng.random() < args.caption_share:
                q, a = shapes.CAPTION_PROMPT, shapes.caption(scene)
            else:
                q, a = question(world, scene, args.colour_share)
            prompts.append(q)
            answers.append(a)
        ids, labels = answer_rows(tokenizer, prompts, answers, tokens)
        chat = world.rng.sample(chat_prompts.TRAIN, args.chat_rows)
        chat_ids, chat_labels = chat_rows(tokenizer, chat, [base_answers[c] for c in chat])
        batch = right_padded(ids + chat_ids, labels + chat_labels, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=world.pixels(scenes)).logits
        loss = group_loss(logits, batch["labels"], slice(0, len(ids)))
        if args.chat_rows:
            loss = loss + args.chat_weight * group_loss(logits, batch["labels"], slice(len(ids), None))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1 or time.time() > stop_at:
            plain = yes_no_accuracy(model, tokenizer, evaluate, tokens, "")
            lmms = yes_no_accuracy(model, tokenizer, evaluate, tokens, LMMS_SUFFIX)
            kept = f", chat kept {chat_kept():.3f}" if args.chat_rows else ""
            log(f"language step {step} loss {loss.item():.4f} held-out yes/no acc {plain:.3f} (lmms-eval prompt {lmms:.3f}){kept}")
        if time.time() > stop_at:
            log(f"stopped at step {step}: the {args.minutes}-minute budget is spent")
            break

    out = Path(args.out)
    previous = json.loads((args.resume / "shapes-smol.json").read_text())["training"] if args.resume else []
    previous_runs = previous if isinstance(previous, list) else [previous]
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    trained = {k: v.detach().clone().contiguous() for k, v in state.items() if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
    trained["image_token_embedding"] = model.get_input_embeddings().weight[model.config.image_token_id].detach().clone()
    trained.update(lora.state())
    save_file(trained, out / TRAINED)
    processor.save_pretrained(out)
    (out / "shapes-smol.json").write_text(json.dumps(
        {"vision_config": vision, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
         "training": [*previous_runs, {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}]}, indent=2))
    (out / "seeright.json").write_text(json.dumps({"model_config": "shapes-smol"}))
    log(f"saved to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")
    (out / "training_log.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
