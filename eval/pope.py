"""POPE (Li et al., 2023): loading, prompts and the exact scorer.

Official parser (``RUCAIBox/POPE`` ``evaluate.py``, identical in LLaVA's ``eval_pope.py``): keep the
text before the first '.', drop ',', split on spaces; any word in {No, not, no} -> "no", else "yes".
Positive class = yes. Other parsers exist only as named options, since they change the numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

SPLITS = ("random", "popular", "adversarial")
PROMPTS = {
    "plain": "{question}",
    "llava": "{question}\nAnswer the question using a single word or phrase.",
    "vcd": "{question} Please answer this question with one word.",
    "vaf": "{question} Please just answer yes or no.",
}
DATA = resources.files("seeright.eval") / "data" / "pope"


def parse_official(text: str) -> str:
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def parse_substring(text: str) -> str:
    """VCD's ``eval_pope.py``: 'yes' anywhere in the lowercased answer (else no)."""
    return "yes" if "yes" in text.lower() else "no"


def parse_pai(text: str) -> str:
    """PAI's ``pope_ans.py``: NEG_WORDS {No, not, no, NO} or any word ending in "n't", after stripping '.' and ','."""
    words = text.replace(".", "").replace(",", "").split()
    return "no" if any(w in ("No", "not", "no", "NO") or w.endswith("n't") for w in words) else "yes"


PARSERS: dict[str, Callable[[str], str]] = {"official": parse_official, "substring": parse_substring, "pai": parse_pai}


@dataclass(frozen=True)
class PopeQuestion:
    question_id: int | str
    image: str
    question: str
    label: str
    split: str


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def split_of(path: str | Path) -> str:
    """The split named in a label file, e.g. ``coco_pope_adversarial.json`` -> ``adversarial``."""
    stem = Path(path).stem
    for split in SPLITS:
        if stem.endswith(split):
            return split
    return stem


def load_questions(path: str | Path, split: str | None = None) -> list[PopeQuestion]:
    """Official POPE JSONL (``question_id, image, text, label``)."""
    split = split or split_of(path)
    return [PopeQuestion(q["question_id"], q["image"], q["text"], q["label"].strip().lower(), split) for q in read_jsonl(path)]


def builtin_questions(split: str, version: str = "current") -> list[PopeQuestion]:
    """The shipped COCO question files; ``version="original"`` is the first release LLaVA-1.5 used."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")
    folder = DATA if version == "current" else DATA / "original_e3e39262"
    return load_questions(Path(str(folder / f"coco_pope_{split}.json")), split)


def load_hf_dataset(source: Any, split: str | None = None) -> list[PopeQuestion]:
    """Rows with lmms-lab/POPE columns (``question_id, question, answer, image_source, image, category``):
    a ``datasets.Dataset``, or a folder saved with ``save_to_disk``. The image is the file
    ``image_source`` (``.jpg`` added when it has no suffix) in the image folder; the embedded images are
    not decoded."""
    if isinstance(source, (str, Path)):
        from datasets import load_from_disk

        source = load_from_disk(str(source))
    if "image" in source.column_names:
        source = source.remove_columns("image")
    rows = []
    for row in source:
        if split is not None and row["category"] != split:
            continue
        image = row["image_source"] if Path(row["image_source"]).suffix else f"{row['image_source']}.jpg"
        rows.append(PopeQuestion(row["question_id"], image, row["question"], row["answer"].strip().lower(), row["category"]))
    return rows


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def metrics(self) -> dict[str, float | int]:
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "n": self.n, "TP": self.tp, "FP": self.fp, "TN": self.tn, "FN": self.fn,
            "accuracy": 100.0 * (self.tp + self.tn) / self.n,
            "precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1,
            "yes_ratio": 100.0 * (self.tp + self.fp) / self.n,
        }


def confusion(predictions: Iterable[str], labels: Iterable[str]) -> Confusion:
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels, strict=True):
        yes_pred, yes_label = pred == "yes", label == "yes"
        tp += yes_pred and yes_label
        fp += yes_pred and not yes_label
        tn += not yes_pred and not yes_label
        fn += not yes_pred and yes_label
    return Confusion(tp, fp, tn, fn)


def summarize(per_split: dict[str, Confusion]) -> dict[str, Any]:
    """Metrics per split and their unweighted mean over splits (as papers average the three splits)."""
    splits = {s: c.metrics() for s, c in per_split.items()}
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {k: sum(m[k] for m in splits.values()) / len(splits) for k in keys}
    return {"splits": splits, "mean": mean}


def score_by_id(answers: list[dict[str, Any]], label_files: list[str | Path], parser: str = "official") -> dict[str, Any]:
    """Join answers (``question_id``, ``text``) to each label file by question id."""
    parse = PARSERS[parser]
    by_id = {a["question_id"]: a for a in answers}
    per_split = {}
    for path in label_files:
        questions = load_questions(path)
        missing = [q.question_id for q in questions if q.question_id not in by_id]
        if missing:
            raise ValueError(f"answers: no answer for {len(missing)} question ids of {Path(path).name}, e.g. {missing[:3]}")
        per_split[split_of(path)] = confusion([parse(by_id[q.question_id]["text"]) for q in questions], [q.label for q in questions])
    return summarize(per_split)


def score_llava_style(
    answers: list[dict[str, Any]], label_files: list[str | Path], questions_file: str | Path, parser: str = "official"
) -> dict[str, Any]:
    """LLaVA's ``eval_pope.py``: answers grouped by the question's ``category`` and zipped in order with the
    label file of that split."""
    parse = PARSERS[parser]
    category = {q["question_id"]: q["category"] for q in read_jsonl(questions_file)}
    per_split = {}
    for path in label_files:
        split = split_of(path)
        labels = [q.label for q in load_questions(path)]
        cur = [a for a in answers if category.get(a["question_id"]) == split]
        if len(cur) != len(labels):
            raise ValueError(f"answers: {len(cur)} answers of category {split!r} for {len(labels)} labels")
        per_split[split] = confusion([parse(a["text"]) for a in cur], labels)
    return summarize(per_split)


def answer_text(answer: dict[str, Any]) -> str:
    for key in ("text", "answer", "prediction", "response"):
        if key in answer:
            return str(answer[key])
    raise ValueError(f"answer {answer.get('question_id')!r}: no text field")


def normalize_answers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"question_id": r["question_id"], "text": answer_text(r)} for r in rows]


def answers_from_lmms_samples(path: str | Path) -> list[dict[str, Any]]:
    """``question_id`` and the model's answer of each sample in lmms-eval's ``--log_samples`` JSONL (the POPE
    task records the question id with each metric; the answer is ``filtered_resps``, raw under the "none"
    filter, or ``resps`` in older versions)."""
    answers = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        sample = json.loads(line)
        qid = (sample.get("doc") or {}).get("question_id", (sample.get("pope_accuracy") or {}).get("question_id"))
        if qid is None:
            raise ValueError(f"lmms_samples: sample {sample.get('doc_id')} has no question id (not a POPE task?)")
        text = sample.get("filtered_resps", sample.get("resps"))
        while isinstance(text, list):
            text = text[0] if text else ""
        answers.append({"question_id": qid, "text": text or ""})
    return answers
