"""Benchmark jobs over any generator, with resumable JSONL results.

A generator is any object with ``generate(prompts, images, interventions, max_new_tokens) -> texts``
(the service wraps its Engine, a thin HTTP client does the same against a running server). Each
prediction is appended to the results file as one JSON line and flushed to disk before the next
batch, so a run that is killed resumes where it stopped: a torn last line is cut off, finished items
are skipped, and the file ends up identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from tqdm import tqdm

from eval import chair, pope

CHAIR_PROMPT = "Please describe this image in detail."


class Generator(Protocol):
    def generate(
        self, prompts: Sequence[str], images: Sequence[Image.Image], interventions: dict[str, dict], max_new_tokens: int
    ) -> list[str]: ...


@dataclass(frozen=True)
class EvalItem:
    """One prediction to make: a key, the prompt, the image file and what to record with the answer."""

    key: str
    prompt: str
    image: Path
    record: dict[str, Any]


def read_done(path: Path) -> list[dict[str, Any]]:
    """Complete records of a results file; a torn last line (a killed write) is cut off the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with path.open("r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in raw[:end].decode().splitlines() if line.strip()]


def _chunks(items: Sequence[EvalItem], size: int) -> Iterator[Sequence[EvalItem]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_items(
    items: Sequence[EvalItem],
    generator: Generator,
    out: Path,
    interventions: dict[str, dict],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Predict every item not yet in ``out``; return all records in item order."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"]: r for r in read_done(out)}
    todo = [it for it in items if it.key not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), disable=not progress, desc=out.stem)
    for batch in _chunks(todo, batch_size):
        images = [Image.open(it.image).convert("RGB") for it in batch]
        texts = generator.generate([it.prompt for it in batch], images, interventions, max_new_tokens)
        with out.open("a") as f:
            for it, text in zip(batch, texts):
                record = {"key": it.key, **it.record, "prompt": it.prompt, "text": text}
                f.write(json.dumps(record) + "\n")
                done[it.key] = record
            f.flush()
            os.fsync(f.fileno())
        bar.update(len(batch))
    bar.close()
    return [done[it.key] for it in items]


def pope_items(questions: Sequence[pope.PopeQuestion], images_dir: Path, prompt: str = "plain") -> list[EvalItem]:
    template = pope.PROMPTS[prompt]
    return [
        EvalItem(
            key=f"{q.split}:{q.question_id}",
            prompt=template.format(question=q.question),
            image=images_dir / q.image,
            record={"question_id": q.question_id, "split": q.split, "image": q.image, "label": q.label},
        )
        for q in questions
    ]


def score_pope_records(records: list[dict[str, Any]], parser: str = "official") -> dict[str, Any]:
    parse = pope.PARSERS[parser]
    per_split: dict[str, tuple[list[str], list[str]]] = {}
    for r in records:
        preds, labels = per_split.setdefault(r["split"], ([], []))
        preds.append(parse(r["text"]))
        labels.append(r["label"])
    return pope.summarize({s: pope.confusion(p, l) for s, (p, l) in per_split.items()})


def chair_items(images_dir: Path, limit: int | None = None, prompt: str = CHAIR_PROMPT) -> list[EvalItem]:
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:limit]
    return [EvalItem(key=p.name, prompt=prompt, image=p, record={"image_id": chair.image_id_of(p.name)}) for p in files]


def score_chair_records(
    records: list[dict[str, Any]], gt: chair.GroundTruth, lemmatizer: str = "builtin"
) -> dict[str, Any]:
    captions = [{"image_id": r["image_id"], "caption": r["text"]} for r in records]
    return chair.ChairScorer(lemmatizer=lemmatizer).score(captions, gt)["metrics"]
