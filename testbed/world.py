"""A procedural image world with known ground truth, and POPE / CHAIR benchmarks on it.

Scenes hold 1-6 coloured objects from a fixed vocabulary on a cluttered background, with partial
occlusion. Objects are drawn with deliberate co-occurrence statistics: each object has a partner that
joins it most of the time (``PARTNER_RATE``), and some objects are far more frequent than others. That is
the mechanism that makes LVLMs hallucinate COCO objects (a fork suggests a knife), so a model trained on
this world learns a language prior that can override the image.

The benchmarks follow the real protocols exactly (``eval/pope.py`` and ``eval/chair.py`` score them):
POPE takes images with at least 3 objects, the first 3 ground-truth objects as positives, each followed by
one negative sampled at random, by popularity, or by co-occurrence with the positive (adversarial); CHAIR
uses the world's own synonym table. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

OBJECTS = (
    "circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond", "arrow", "moon", "hexagon", "bar",
)
SYNONYMS = {
    "circle": ["circle", "disc", "dot"], "square": ["square", "box", "block"], "triangle": ["triangle"],
    "star": ["star"], "heart": ["heart"], "cross": ["cross", "plus"], "ring": ["ring", "loop"],
    "diamond": ["diamond", "rhombus"], "arrow": ["arrow"], "moon": ["moon", "crescent"], "hexagon": ["hexagon"],
    "bar": ["bar", "stripe"],
}
PARTNERS = {  # symmetric pairs that appear together most of the time
    "star": "moon", "moon": "star", "heart": "ring", "ring": "heart", "circle": "square", "square": "circle",
    "triangle": "arrow", "arrow": "triangle", "diamond": "hexagon", "hexagon": "diamond", "cross": "bar", "bar": "cross",
}
PARTNER_RATE = 0.85
POPULARITY = {name: 1.0 / (1 + i) ** 0.8 for i, name in enumerate(OBJECTS)}  # Zipf-like: circle most frequent
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
    "purple": (150, 60, 190), "orange": (240, 130, 30),
}
SIZE = 64
DEFAULT_SEED = 1234  # the benchmark whose scores the manual reports (docs/testbed.md)
CAPTION_PROMPT = "Describe the image."  # the training captions' prompt, also the CHAIR prompt


@dataclass(frozen=True)
class Placed:
    name: str
    color: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    image_id: int
    objects: tuple[Placed, ...]

    @property
    def names(self) -> list[str]:
        """Ground-truth objects in drawing order, each once."""
        return list(dict.fromkeys(o.name for o in self.objects))


def sample_scene(rng: random.Random, image_id: int, max_objects: int = 6) -> Scene:
    """Objects by popularity, each pulling in its partner with probability ``PARTNER_RATE``."""
    target = rng.randint(1, max_objects)
    names: list[str] = []
    while len(names) < target:
        name = rng.choices(OBJECTS, weights=[POPULARITY[o] for o in OBJECTS])[0]
        if name in names:
            continue
        names.append(name)
        partner = PARTNERS[name]
        if len(names) < target and partner not in names and rng.random() < PARTNER_RATE:
            names.append(partner)
    placed: list[Placed] = []
    for name in names:
        for _ in range(50):  # at most half of a new object may cover earlier ones
            side = rng.randint(14, 22)
            x, y = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
            box = (x, y, x + side, y + side)
            if all(_overlap(box, p.box) <= 0.5 * side * side for p in placed):
                placed.append(Placed(name, rng.choice(list(COLORS)), box))
                break
    return Scene(image_id, tuple(placed))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def render(scene: Scene, seed: int) -> Image.Image:
    """The scene on a textured, cluttered background."""
    rng = random.Random(seed * 1_000_003 + scene.image_id)
    base = tuple(rng.randint(170, 235) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), base)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(4, 10)):  # clutter: thin grey strokes
        x0, y0, x1, y1 = (rng.randint(0, SIZE) for _ in range(4))
        shade = rng.randint(120, 200)
        draw.line([x0, y0, x1, y1], fill=(shade, shade, shade), width=1)
    for obj in scene.objects:
        _draw(draw, obj, base)
    return image


def _draw(draw: ImageDraw.ImageDraw, obj: Placed, background: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = obj.box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    fill = COLORS[obj.color]
    if obj.name == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.name == "square":
        draw.rectangle(obj.box, fill=fill)
    elif obj.name == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.name == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif obj.name == "hexagon":
        draw.regular_polygon((cx, cy, r), 6, fill=fill)
    elif obj.name == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        draw.polygon(pts, fill=fill)
    elif obj.name == "heart":
        draw.ellipse((x0, y0, cx, cy + r * 0.2), fill=fill)
        draw.ellipse((cx, y0, x1, cy + r * 0.2), fill=fill)
        draw.polygon([(x0 + 1, cy), (x1 - 1, cy), (cx, y1)], fill=fill)
    elif obj.name == "cross":
        t = max(2, int(r * 0.45))
        draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
    elif obj.name == "ring":
        draw.ellipse(obj.box, outline=fill, width=max(2, int(r * 0.35)))
    elif obj.name == "arrow":
        t = max(2, int(r * 0.3))
        draw.rectangle((x0, cy - t, cx, cy + t), fill=fill)
        draw.polygon([(cx, y0), (x1, cy), (cx, y1)], fill=fill)
    elif obj.name == "moon":
        draw.ellipse(obj.box, fill=fill)
        draw.ellipse((x0 + r * 0.6, y0 - r * 0.2, x1 + r * 0.6, y1 - r * 0.2), fill=background)
    elif obj.name == "bar":
        t = max(2, int(r * 0.35))
        draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)


def article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """A training caption naming every object with its colour, in drawing order."""
    parts = [f"{article(o.color)} {o.color} {o.name}" for o in scene.objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"There is {listed}."


def synonyms_text() -> str:
    """The world's synonym table in CHAIR's format (first word = canonical name)."""
    return "\n".join(", ".join(SYNONYMS[name]) for name in OBJECTS) + "\n"


def pope_questions(scenes: list[Scene], split: str, rng: random.Random) -> list[dict]:
    """POPE's generator: images with >= 3 objects, first 3 positives, each followed by one negative."""
    pool = Counter(name for s in scenes for name in s.names)
    pairs = Counter((a, b) for s in scenes for a in s.names for b in s.names if a != b)
    questions, qid = [], 0
    for scene in scenes:
        if len(scene.names) < 3:
            continue
        positives, asked = scene.names[:3], set(scene.names[:3])
        for positive in positives:
            candidates = [o for o in pool if o not in scene.names and o not in asked]
            if not candidates:
                continue
            if split == "random":
                negative = rng.choice(sorted(candidates))
            elif split == "popular":
                negative = max(candidates, key=lambda o: (pool[o], -OBJECTS.index(o)))
            else:  # adversarial: what co-occurs most with the positive
                negative = max(candidates, key=lambda o: (pairs[(positive, o)], pool[o], -OBJECTS.index(o)))
            asked.add(negative)
            for obj, label in ((positive, "yes"), (negative, "no")):
                qid += 1
                questions.append({
                    "question_id": qid, "image": image_name(scene.image_id),
                    "text": f"Is there {article(obj)} {obj} in the image?", "label": label,
                })
    return questions


def image_name(image_id: int) -> str:
    return f"SHAPES_{image_id:06d}.png"


def generate_scenes(n: int, seed: int, first_id: int = 1) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, first_id + i) for i in range(n)]


def write_benchmark(out: Path, n_images: int = 300, seed: int = DEFAULT_SEED) -> dict[str, int]:
    """Images, POPE question files per split, CHAIR ground truth and synonyms under ``out``."""
    scenes = generate_scenes(n_images, seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "pope").mkdir(exist_ok=True)
    (out / "chair").mkdir(exist_ok=True)
    for scene in scenes:
        render(scene, seed).save(out / "images" / image_name(scene.image_id))
    counts = {}
    for split in ("random", "popular", "adversarial"):
        questions = pope_questions(scenes, split, random.Random(f"{seed}-{split}"))
        (out / "pope" / f"shapes_pope_{split}.json").write_text("".join(json.dumps(q) + "\n" for q in questions))
        counts[split] = len(questions)
    gt = {str(s.image_id): sorted(s.names) for s in scenes}
    (out / "chair" / "gt.json").write_text(json.dumps(gt))
    (out / "chair" / "synonyms.txt").write_text(synonyms_text())
    return counts
