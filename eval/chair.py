"""CHAIR (Rohrbach et al., 2018) with the OPERA ``chair.py`` protocol, the de-facto standard.

Caption -> objects: lowercase, tokenise, lemmatise, merge two-word names (``double_word_dict``), drop
'seat' when 'toilet' is present, keep words of the synonym vocabulary and map them to canonical names.
CHAIR_I = hallucinated object mentions / object mentions (repeats counted); CHAIR_S = captions with a
hallucinated mention / captions; Recall = sum |GT objects mentioned| / sum |GT objects|; Len = mean
number of words after double-word merging (punctuation included).

Lemmatisers: ``builtin`` needs no download. It reproduces what NLTK's tagger + WordNet lemmatiser do to
the words that CHAIR counts: plural forms of vocabulary nouns (regular and irregular) become singular,
and '-ing' verb forms of vocabulary words become the word ('skiing' -> 'ski', as a VBG tag does).
``nltk`` runs OPERA's exact pipeline when NLTK and its data (punkt, tagger, wordnet) are installed.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal

COCO_DOUBLE_WORDS = [
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "hot dog", "teddy bear", "home plate",
    "train track",
]
ANIMAL_WORDS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub"]
VEHICLE_WORDS = ["jet", "train"]
IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "children": "child", "people": "people", "mice": "mouse", "geese": "goose",
    "knives": "knife", "wives": "wife", "teeth": "tooth", "feet": "foot", "oxen": "ox", "sheep": "sheep",
    "policemen": "policeman", "gentlemen": "gentleman", "servicemen": "serviceman", "grandchildren": "grandchild",
    "calves": "calf", "leaves": "leaf", "shelves": "shelf", "loaves": "loaf", "halves": "half",
}
TOKEN = re.compile(r"n't|'[a-z]+|[a-z0-9]+(?:[-.][a-z0-9]+)*|[^\sa-z0-9]")
DATA = resources.files("seeright.eval") / "data" / "chair"
GroundTruth = dict[int, set[str]]


def load_synonyms(text: str) -> list[list[str]]:
    """Synonym lines exactly as OPERA parses them (``strip().split(', ')``, quirks kept)."""
    return [line.strip().split(", ") for line in text.splitlines()]


def image_id_of(value: Any) -> int:
    """An int id, or the id inside a COCO file name (``COCO_val2014_000000123456.jpg``)."""
    if isinstance(value, int):
        return value
    digits = re.findall(r"\d+", str(value))
    if not digits:
        raise ValueError(f"image_id {value!r} has no number")
    return int(digits[-1])


def load_ground_truth(path: str | Path | None = None, variant: Literal["nltk", "pattern"] = "nltk") -> GroundTruth:
    """Image id -> canonical objects: a shipped ``*.json.gz`` (default: the NLTK-built one) or a JSON file."""
    if path is None:
        name = {"nltk": "nltk_wordnet_lemma", "pattern": "pattern_singularize"}[variant]
        path = DATA / f"coco2014_trainval_imid_to_objects.{name}.json.gz"
    raw = Path(str(path)).read_bytes()
    data = json.loads(gzip.decompress(raw) if str(path).endswith(".gz") else raw)
    return {int(k): set(v) for k, v in data.items()}


def ground_truth_from_coco(instances: Iterable[str | Path], captions: Iterable[str | Path], scorer: ChairScorer) -> GroundTruth:
    """Build ground truth from COCO annotation files: instance categories + objects named in GT captions."""
    gt: GroundTruth = {}
    for path in instances:
        data = json.loads(Path(path).read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        for ann in data["annotations"]:
            gt.setdefault(ann["image_id"], set()).add(scorer.synonym_of.get(names[ann["category_id"]], names[ann["category_id"]]))
    for path in captions:
        for ann in json.loads(Path(path).read_text())["annotations"]:
            gt.setdefault(ann["image_id"], set()).update(scorer.caption_objects(ann["caption"])[1])
    return gt


class BuiltinLemmatizer:
    """Singular forms for the vocabulary CHAIR counts; other words pass through unchanged."""

    def __init__(self, vocabulary: Iterable[str]) -> None:
        words = {w for phrase in vocabulary for w in phrase.split()}
        self.lemma: dict[str, str] = {}
        for w in words:
            for plural in self._plurals(w):
                self.lemma.setdefault(plural, w)
            for ing in (w + "ing", w[:-1] + "ing" if w.endswith("e") else None):
                if ing and ing not in words:
                    self.lemma.setdefault(ing, w)
        for plural, singular in IRREGULAR_PLURALS.items():
            self.lemma[plural] = singular
        for w in words:
            self.lemma.pop(w, None)  # a vocabulary word is its own lemma

    @staticmethod
    def _plurals(word: str) -> list[str]:
        out = [word + "s"]
        if re.search(r"(s|x|z|ch|sh|o)$", word):
            out.append(word + "es")
        if re.search(r"[^aeiou]y$", word):
            out.append(word[:-1] + "ies")
        if word.endswith("fe"):
            out.append(word[:-2] + "ves")
        elif word.endswith("f"):
            out.append(word[:-1] + "ves")
        return out

    def __call__(self, tokens: list[str]) -> list[str]:
        return [self.lemma.get(t, t) for t in tokens]


class NltkLemmatizer:
    """OPERA's pipeline: ``nltk.pos_tag`` then ``WordNetLemmatizer`` with the mapped POS (noun by default)."""

    def __init__(self) -> None:
        import nltk
        from nltk.corpus import wordnet
        from nltk.stem import WordNetLemmatizer

        self.nltk, self.wordnet, self.wnl = nltk, wordnet, WordNetLemmatizer()

    def tokenize(self, text: str) -> list[str]:
        return self.nltk.word_tokenize(text)

    def __call__(self, tokens: list[str]) -> list[str]:
        pos = {"J": self.wordnet.ADJ, "V": self.wordnet.VERB, "N": self.wordnet.NOUN, "R": self.wordnet.ADV}
        return [self.wnl.lemmatize(w, pos=pos.get(tag[:1], self.wordnet.NOUN)) for w, tag in self.nltk.pos_tag(tokens)]


@dataclass
class CaptionResult:
    image_id: int
    caption: str
    words: list[str]
    generated: list[str]
    hallucinated: list[tuple[str, str]]
    gt: list[str]
    recall_objects: set[str] = field(default_factory=set)


class ChairScorer:
    """Scores captions against ground-truth objects with the OPERA protocol."""

    def __init__(self, lemmatizer: Literal["builtin", "nltk"] = "builtin", synonyms: str | None = None) -> None:
        text = synonyms if synonyms is not None else (DATA / "synonyms.txt").read_text()
        self.synonyms = load_synonyms(text)
        self.vocabulary: set[str] = {w for line in self.synonyms for w in line}
        self.synonym_of: dict[str, str] = {w: line[0] for line in self.synonyms for w in line}
        self.double_words = {w: w for w in COCO_DOUBLE_WORDS}
        for animal in ANIMAL_WORDS:
            self.double_words[f"baby {animal}"] = animal
            self.double_words[f"adult {animal}"] = animal
        for vehicle in VEHICLE_WORDS:
            self.double_words[f"passenger {vehicle}"] = vehicle
        self.double_words.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
        self.lemmatizer_name = lemmatizer

    @cached_property
    def _lemmatizer(self) -> BuiltinLemmatizer | NltkLemmatizer:
        if self.lemmatizer_name == "nltk":
            return NltkLemmatizer()
        return BuiltinLemmatizer(self.vocabulary | set(self.double_words))

    def tokenize(self, caption: str) -> list[str]:
        if isinstance(self._lemmatizer, NltkLemmatizer):
            return self._lemmatizer.tokenize(caption.lower())
        return TOKEN.findall(caption.lower())

    def caption_objects(self, caption: str) -> tuple[list[str], list[str], list[str]]:
        """(object words, canonical names, all words after double-word merging) of a caption."""
        words = self._lemmatizer(self.tokenize(caption))
        merged, i = [], 0
        while i < len(words):
            pair = " ".join(words[i : i + 2])
            if pair in self.double_words:
                merged.append(self.double_words[pair])
                i += 2
            else:
                merged.append(words[i])
                i += 1
        kept = [w for w in merged if not ("toilet" in merged and "seat" in merged and w == "seat")]
        objects = [w for w in kept if w in self.vocabulary]
        return objects, [self.synonym_of[w] for w in objects], merged

    def score_caption(self, image_id: int, caption: str, gt: set[str]) -> CaptionResult:
        objects, nodes, words = self.caption_objects(caption)
        res = CaptionResult(image_id, caption, words, nodes, [], sorted(gt))
        for word, node in zip(objects, nodes):
            if node in gt:
                res.recall_objects.add(node)
            else:
                res.hallucinated.append((word, node))
        return res

    def score(self, captions: list[dict[str, Any]], gt: GroundTruth, per_caption: bool = False) -> dict[str, Any]:
        """Metrics in percent (``Len`` in words) over ``captions`` (dicts with image_id and caption/text)."""
        results = []
        for i, item in enumerate(captions):
            image_id = image_id_of(item["image_id"])
            if image_id not in gt:
                raise ValueError(f"captions[{i}].image_id: {image_id} has no ground truth")
            text = item.get("caption", item.get("text"))
            if text is None:
                raise ValueError(f"captions[{i}]: needs 'caption' or 'text'")
            results.append(self.score_caption(image_id, text, gt[image_id]))
        if not results:
            raise ValueError("captions: nothing to score")
        mentions = sum(len(r.generated) for r in results)
        gt_total = sum(len(r.gt) for r in results)
        metrics = {
            "CHAIR_S": 100.0 * sum(bool(r.hallucinated) for r in results) / len(results),
            "CHAIR_I": 100.0 * sum(len(r.hallucinated) for r in results) / mentions if mentions else 0.0,
            "Recall": 100.0 * sum(len(r.recall_objects) for r in results) / gt_total if gt_total else 0.0,
            "Len": sum(len(r.words) for r in results) / len(results),
            "n": len(results),
        }
        out: dict[str, Any] = {"metrics": metrics, "lemmatizer": self.lemmatizer_name}
        if per_caption:
            out["captions"] = [
                {
                    "image_id": r.image_id,
                    "caption": r.caption,
                    "mscoco_generated_words": r.generated,
                    "mscoco_gt_words": r.gt,
                    "mscoco_hallucinated_words": [list(h) for h in r.hallucinated],
                    "words": r.words,
                    "metrics": {
                        "CHAIRs": int(bool(r.hallucinated)),
                        "CHAIRi": len(r.hallucinated) / len(r.generated) if r.generated else 0.0,
                        "Recall": len(r.recall_objects) / len(r.gt) if r.gt else 0.0,
                    },
                }
                for r in results
            ]
        return out


def read_captions(path: str | Path) -> list[dict[str, Any]]:
    """JSONL (or a JSON list) of ``{image_id, caption|text}``."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]
