"""Train a small LLaVA on the shapes world (``testbed/world.py``), on a CPU, from a fixed seed.

``python -m seeright.testbed.train`` writes ``model_zoo/shapes-llava`` (the packaged
``seeright/shapes-llava``) with its training log. The recipe, and what mattered (docs/testbed.md):
1. Vision pretraining: the ViT (64x64 images, 16x16 patches: 16 image tokens, an object covers 1-4) learns,
   per patch, which objects cover at least 15% of it (multi-label), and from the mean of its patches which
   objects are present. Image tokens then carry object identity before the language model sees them.
2. Projector warm start: the MLP projector starts as that per-patch classifier followed by a lookup of
   the object names' word embeddings, so an image token looks like the words of what it shows, and a
   background token like ``<pad>`` (``--no-warm-start`` keeps the random init, for the ablation).
3. Language stage (tower frozen): the decoder (from scratch) and projector learn yes/no questions, then
   captions join at ``--caption-share``. Answers are the only supervised tokens. The learning rate
   matters most: 1e-3 stalls near 0.8 held-out accuracy, 3e-4 passes 0.9.
Captions list objects in drawing order, so a partner tends to follow its object in text: the language
prior that makes the model hallucinate partners. Yes/no negatives are random absent objects.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from seeright.testbed import world as shapes

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
PROMPT_WORDS = "USER ASSISTANT : Describe the image . Is there a an in ? Yes No There is , and What objects are".split()
COVER = 0.15  # a patch shows an object when the object's box covers this share of it


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: the prompt words, colours and every object synonym."""
    words = dict.fromkeys(SPECIALS + PROMPT_WORDS + list(shapes.COLORS) + [w for syn in shapes.SYNONYMS.values() for w in syn])
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="left"
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int, patch: int = 16) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=shapes.SIZE, patch_size=patch, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, projection_dim=128,
        ),
        text_config=LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    config.pad_token_id = 3
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 3, 2
    return model


class World:
    """Endless training scenes (ids disjoint from the benchmarks') and their samples."""

    def __init__(self, seed: int, processor: CLIPImageProcessorPil) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.processor = processor
        self.next_id = 10_000_000

    def scenes(self, n: int) -> list[shapes.Scene]:
        out = [shapes.sample_scene(self.rng, self.next_id + i) for i in range(n)]
        self.next_id += n
        return out

    def pixels(self, scenes: list[shapes.Scene]) -> torch.Tensor:
        return self.processor([shapes.render(s, self.seed) for s in scenes], return_tensors="pt")["pixel_values"]

    def question(self, scene: shapes.Scene) -> tuple[str, str]:
        if self.rng.random() < 0.5:
            name, answer = self.rng.choice(scene.names), "Yes"
        else:
            name, answer = self.rng.choice([o for o in shapes.OBJECTS if o not in scene.names]), "No"
        return f"Is there {shapes.article(name)} {name} in the image?", answer


def encode_batch(tokenizer, prompts: list[str], answers: list[str], image_tokens: int) -> dict[str, torch.Tensor]:
    """Right-padded ``USER: <image>\\n{prompt} ASSISTANT: {answer}</s>`` with loss on the answer only."""
    image = "<image>" * image_tokens
    ids, labels = [], []
    for prompt, answer in zip(prompts, answers):
        head = tokenizer(f"USER: {image}\n{prompt} ASSISTANT:")["input_ids"]
        tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(head + tail)
        labels.append([-100] * len(head) + tail)
    return right_padded(ids, labels, tokenizer.pad_token_id)


def right_padded(ids: list[list[int]], labels: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Rows of token ids and their labels right-padded into ``input_ids``, ``attention_mask`` and ``labels``
    (-100, no loss, on the padding)."""
    width = max(len(x) for x in ids)
    return {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
    }


def image_tokens(model) -> int:
    return (shapes.SIZE // model.config.vision_config.patch_size) ** 2


def patch_cover(scene: shapes.Scene, patch: int, attribute: str = "name", values: tuple[str, ...] = shapes.OBJECTS) -> torch.Tensor:
    """``[patches, values]``: the share of each patch covered by the boxes of objects whose ``attribute`` (name
    or color) is each value (later objects on top)."""
    owner = torch.full((shapes.SIZE, shapes.SIZE), -1, dtype=torch.long)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        owner[y0:y1, x0:x1] = values.index(getattr(obj, attribute))
    grid = shapes.SIZE // patch
    share = torch.stack([(owner == k).float() for k in range(len(values))], -1)
    return share.reshape(grid, patch, grid, patch, -1).mean((1, 3)).reshape(grid * grid, -1)


def pretrain_vision(model, world: World, steps: int, batch: int, lr: float, log) -> torch.nn.Linear:
    """Stage 1; returns the per-patch object classifier."""
    tower = model.model.vision_tower
    patch = tower.config.patch_size
    classes = len(shapes.OBJECTS)
    patch_head = torch.nn.Linear(tower.config.hidden_size, classes)
    scene_head = torch.nn.Linear(tower.config.hidden_size, classes)
    params = list(tower.parameters()) + list(patch_head.parameters()) + list(scene_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for step in range(steps):
        scenes = world.scenes(batch)
        present = torch.tensor([[float(o in s.names) for o in shapes.OBJECTS] for s in scenes])
        covered = (torch.stack([patch_cover(s, patch) for s in scenes]) > COVER).float()
        feats = tower(world.pixels(scenes)).last_hidden_state[:, 1:]
        patch_logits = patch_head(feats)
        loss = F.binary_cross_entropy_with_logits(patch_logits, covered)
        loss = loss + F.binary_cross_entropy_with_logits(scene_head(feats.mean(1)), present)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            found = ((patch_logits.amax(1) > 0).float() == present).float().mean().item()
            log(f"vision step {step} loss {loss.item():.4f} presence-from-patches acc {found:.3f}")
    return patch_head


@torch.no_grad()
def warm_start_projector(model, patch_head: torch.nn.Linear, tokenizer) -> None:
    """Stage 2: ``proj(f) = E_names^T GELU(W_patch f / 4) + e_<pad>``: image tokens start as the word
    embeddings of the objects they show (weighted by the classifier's confidence), background as ``<pad>``."""
    proj = model.model.multi_modal_projector
    classes = patch_head.out_features
    names = model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(list(shapes.OBJECTS))]
    proj.linear_1.weight.zero_()
    proj.linear_1.bias.zero_()
    proj.linear_1.weight[:classes] = patch_head.weight / 4
    proj.linear_1.bias[:classes] = patch_head.bias / 4
    proj.linear_2.weight.zero_()
    proj.linear_2.weight[:, :classes] = names.T
    proj.linear_2.bias.copy_(model.get_input_embeddings().weight[tokenizer.pad_token_id])


def train_language(model, tokenizer, world: World, steps: int, batch: int, lr: float, caption_share, log, evaluate) -> None:
    """Stage 3 (tower frozen): ``caption_share(step)`` of the samples are captions, the rest yes/no."""
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.1, 1 - s / steps))
    for step in range(steps):
        scenes = world.scenes(batch)
        prompts, answers = [], []
        for scene in scenes:
            if world.rng.random() < caption_share(step):
                q, a = shapes.CAPTION_PROMPT, shapes.caption(scene)
            else:
                q, a = world.question(scene)
            prompts.append(q)
            answers.append(a)
        loss = model(**encode_batch(tokenizer, prompts, answers, image_tokens(model)), pixel_values=world.pixels(scenes)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"language step {step} loss {loss.item():.4f} held-out yes/no acc {evaluate():.3f}")


@torch.no_grad()
def yes_no_accuracy(model, tokenizer, world: World, n: int = 256) -> float:
    """Held-out yes/no accuracy from the first generated token."""
    def encode(questions: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = encode_batch(tokenizer, questions, ["" for _ in questions], image_tokens(model))
        return inputs, inputs["attention_mask"].sum(1) - 2  # the position before the trailing eos predicts the answer

    return answer_accuracy(model, tokenizer, world, encode, n)


def answer_accuracy(model, tokenizer, world: World, encode, n: int) -> float:
    """Share of ``n`` held-out object questions whose answer position ranks Yes vs No right; ``encode(questions)``
    gives the batch and each row's answer position."""
    model.eval()
    scenes = world.scenes(n)
    qa = [world.question(s) for s in scenes]
    inputs, last = encode([q for q, _ in qa])
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=world.pixels(scenes)).logits
    yes, no = tokenizer.convert_tokens_to_ids("Yes"), tokenizer.convert_tokens_to_ids("No")
    says_yes = (logits[torch.arange(n), last][:, [yes, no]].argmax(-1) == 0).tolist()
    model.train()
    return sum(y == (a == "Yes") for y, (_, a) in zip(says_yes, qa)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="model_zoo/shapes-llava")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=8000)
    parser.add_argument("--language-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--patch", type=int, default=16, choices=[8, 16, 32], help="ViT patch size (16: 16 image tokens)")
    parser.add_argument("--no-warm-start", action="store_true", help="keep the projector's random init (ablation)")
    parser.add_argument("--language-lr", type=float, default=3e-4)
    parser.add_argument("--caption-share", type=float, default=0.3, help="share of captions once they join")
    parser.add_argument("--captions-from", type=float, default=0.5, help="fraction of the language stage before captions join")
    args = parser.parse_args()
    start = time.time()
    log_lines: list[str] = []

    def log(msg: str) -> None:
        line = f"[{time.time() - start:7.1f}s] {msg}"
        print(line, flush=True)
        log_lines.append(line)

    log(f"arguments: {json.dumps(vars(args))}")
    tokenizer = build_tokenizer()
    processor = CLIPImageProcessorPil(size={"shortest_edge": shapes.SIZE}, crop_size={"height": shapes.SIZE, "width": shapes.SIZE})
    model = build_model(tokenizer, args.seed, args.patch).train()
    world = World(args.seed, processor)
    patch_head = pretrain_vision(model, world, args.vision_steps, 64, 1e-3, log)
    if not args.no_warm_start:
        warm_start_projector(model, patch_head, tokenizer)
    first_caption_step = int(args.captions_from * args.language_steps)
    train_language(
        model, tokenizer, world, args.language_steps, args.batch, args.language_lr,
        lambda step: args.caption_share if step >= first_caption_step else 0.0, log,
        lambda: yes_no_accuracy(model, tokenizer, World(args.seed + 1, processor)),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "seeright.json").write_text(json.dumps({"model_config": "shapes-llava"}))
    log(f"saved to {out}")
    (out / "training_log.txt").write_text("\n".join(log_lines) + "\n")


if __name__ == "__main__":
    main()
