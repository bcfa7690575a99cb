"""lmms-eval's own POPE task on a local shapes-world POPE set, for running lmms-eval against the server.

lmms-eval's ``pope`` task reads ``lmms-lab-encoder/POPE`` from the hub; here its data is swapped for a
POPE split written from the shapes world (``seeright.testbed.world``) and saved with ``datasets.save_to_disk``, and
everything else (prompt with its "Answer the question using a single word or phrase." suffix, greedy
generation settings, exact-match scoring) comes from lmms-eval's installed ``pope.yaml`` through ``include``.
:func:`seeright.eval.pope.answers_from_lmms_samples` reads lmms-eval's ``--log_samples`` file back for
``seeright score pope``, so both scorers read the same answers.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

from seeright.testbed import world

TASK = "seeright_shapes_pope"


def write_task(
    out: Path, n_images: int = 100, seed: int = world.DEFAULT_SEED, split: str = "adversarial", pope_yaml: Path | None = None,
) -> dict[str, Any]:
    """Write the dataset (``out/data``), the label file (``out/labels``) and the task (``out/<TASK>.yaml``,
    including ``pope_yaml``: lmms-eval's POPE task file, by default the one of the lmms-eval installed here).
    Returns the task name, the number of questions and the label file's path."""
    import datasets

    out = out.resolve()
    scenes = world.generate_scenes(n_images, seed)
    questions = world.pope_questions(scenes, split, random.Random(f"{seed}-{split}"))
    by_name = {world.image_name(s.image_id): s for s in scenes}
    features = datasets.Features({
        "question_id": datasets.Value("int64"), "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "category": datasets.Value("string"), "image_source": datasets.Value("string"), "image": datasets.Image(),
    })
    rows = {
        "question_id": [q["question_id"] for q in questions], "question": [q["text"] for q in questions],
        "answer": [q["label"] for q in questions], "category": [split] * len(questions),
        "image_source": [q["image"] for q in questions],
        "image": [world.render(by_name[q["image"]], seed) for q in questions],
    }
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(out / "data"))
    labels = out / "labels" / f"shapes_pope_{split}.json"
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_text("".join(json.dumps(q) + "\n" for q in questions))
    (out / f"{TASK}.yaml").write_text(
        f"include: {pope_yaml or installed_pope_yaml()}\ntask: {TASK}\ndataset_path: {out / 'data'}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
    )
    return {"task": TASK, "questions": len(questions), "labels": str(labels), "include_path": str(out)}


def installed_pope_yaml() -> Path:
    """The POPE task file of the lmms-eval installed beside seeright (found without importing lmms-eval)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        raise ValueError("lmms-eval is not installed here; pass its environment's pope.yaml (see docs/evaluation.md, lmms-eval)")
    return Path(spec.origin).parent / "tasks" / "pope" / "pope.yaml"
