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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image
from tqdm import tqdm

from seeright.eval import chair, pope

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


def read_done(path: Path, repair: bool = True) -> list[dict[str, Any]]:
    """Complete records of a results file. With ``repair``, a torn last line (a killed write) is cut off
    the file; without, it is only skipped (for readers while a writer may be appending)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if repair and end < len(raw):
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
    on_batch: Callable[[int, int], None] | None = None,
    confine: Path | None = None,
) -> list[dict[str, Any]]:
    """Predict every item not yet in ``out``; return all records in item order.

    ``on_batch(done, total)`` is called after each batch is on disk. With ``confine``, an image whose path resolves
    outside that folder (a symlink out of it) is refused with a ``ValueError``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"]: r for r in read_done(out)}
    todo = [it for it in items if it.key not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), disable=not progress, desc=out.stem)
    for batch in _chunks(todo, batch_size):
        if confine is not None:
            for it in batch:
                if not it.image.resolve().is_relative_to(confine.resolve()):
                    raise ValueError(f"images: {it.image.name} links outside the image folder")
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
        if on_batch is not None:
            on_batch(len(done), len(items))
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
    records: list[dict[str, Any]], gt: chair.GroundTruth, lemmatizer: str = "builtin", synonyms: str | None = None
) -> dict[str, Any]:
    captions = [{"image_id": r["image_id"], "caption": r["text"]} for r in records]
    return chair.ChairScorer(lemmatizer=lemmatizer, synonyms=synonyms).score(captions, gt)["metrics"]


DEFAULT_MAX_NEW_TOKENS = {"pope": 10, "chair": 512}


@dataclass(frozen=True)
class BenchmarkSpec:
    """What to run: a benchmark over an image folder, its splits, prompt and limits."""

    benchmark: Literal["pope", "chair"]
    images: Path
    splits: tuple[str, ...] = pope.SPLITS
    limit: int | None = None
    prompt: str = "plain"
    questions: Path | None = None
    dataset: Path | None = None  # a datasets folder with lmms-lab/POPE columns
    gt: Path | None = None
    synonyms: Path | None = None  # CHAIR synonym table (default: COCO's)
    chair_prompt: str = CHAIR_PROMPT
    lemmatizer: str = "builtin"
    max_new_tokens: int | None = None
    batch_size: int = 8

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[self.benchmark]


def benchmark_items(spec: BenchmarkSpec) -> list[EvalItem]:
    if spec.benchmark == "chair":
        return chair_items(spec.images, spec.limit, spec.chair_prompt)
    questions = []
    for split in spec.splits:
        if spec.dataset is not None:
            loaded = pope.load_hf_dataset(spec.dataset, split)
        elif spec.questions is not None:
            loaded = pope.load_questions(pope_file(spec.questions, split), split)
        else:
            loaded = pope.builtin_questions(split)
        questions += loaded[: spec.limit]
    return pope_items(questions, spec.images, spec.prompt)


def pope_file(folder: Path, split: str) -> Path:
    """The question file of ``split`` in ``folder``: ``<prefix>_pope_<split>.json`` (e.g. coco_pope_random.json)."""
    found = sorted(folder.glob(f"*pope_{split}.json"))
    if len(found) != 1:
        raise ValueError(f"questions: expected one *pope_{split}.json in {folder}, found {len(found)}")
    return found[0]


def score_records(spec: BenchmarkSpec, records: list[dict[str, Any]], gt: chair.GroundTruth | None = None) -> dict[str, Any]:
    if not records:
        return {}
    if spec.benchmark == "pope":
        return score_pope_records(records)
    synonyms = spec.synonyms.read_text() if spec.synonyms else None
    return score_chair_records(records, gt if gt is not None else chair.load_ground_truth(spec.gt), spec.lemmatizer, synonyms)


def run_benchmark(
    spec: BenchmarkSpec,
    generator: Generator,
    out: Path,
    interventions: dict[str, dict],
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
    confine: Path | None = None,
    gt: chair.GroundTruth | None = None,
) -> dict[str, Any]:
    """Run (or resume) one method on one benchmark; its metrics (``confine``: see :func:`run_items`; ``gt``: CHAIR's
    ground truth when the caller holds it already)."""
    records = run_items(
        benchmark_items(spec), generator, out, interventions, spec.new_tokens, spec.batch_size, progress, on_batch,
        confine,
    )
    return score_records(spec, records, gt)
