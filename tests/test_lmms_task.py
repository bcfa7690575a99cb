"""The lmms-eval POPE task over a local shapes split: what lmms-eval reads, and reading back what it logs.

lmms-eval itself runs in its own environment (README, "lmms-eval"); here the task's files are checked as
lmms-eval loads them (``datasets.load_from_disk``, its POPE ``doc_to_text`` contract) and a samples file in
lmms-eval 0.7's format is scored by ``seeright score pope --lmms-samples``.
"""

from __future__ import annotations

import json

import datasets

from seeright import cli
from seeright.eval import pope
from seeright.testbed import lmms_task
from seeright.testbed import world


def test_task_files_are_what_lmms_eval_loads(tmp_path):
    pope_yaml = tmp_path / "lmms" / "pope.yaml"
    task = lmms_task.write_task(tmp_path / "task", n_images=12, seed=7, split="popular", pope_yaml=pope_yaml)
    data = datasets.load_from_disk(str(tmp_path / "task" / "data"))["test"]
    labels = pope.load_questions(task["labels"])
    assert len(data) == len(labels) == task["questions"] > 0
    assert data[0]["question_id"] == labels[0].question_id and data[0]["answer"] in ("yes", "no")
    assert data[0]["image"].size == (world.SIZE, world.SIZE) and data[0]["image_source"] == labels[0].image
    assert [row["question"] for row in data] == [q.question for q in labels]
    yaml = (tmp_path / "task" / f"{lmms_task.TASK}.yaml").read_text()
    assert f"include: {pope_yaml}" in yaml and f"dataset_path: {(tmp_path / 'task' / 'data').resolve()}" in yaml
    assert "load_from_disk: true" in yaml


def test_lmms_samples_score_with_seeright_scorer(tmp_path, capsys):
    task = lmms_task.write_task(tmp_path / "task", n_images=12, seed=7, pope_yaml=tmp_path / "pope.yaml")
    questions = pope.load_questions(task["labels"])
    answers = ["Yes" if q.label == "yes" else "There is a red circle." for q in questions]  # a captioning model
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({
        "doc_id": i, "target": q.label, "filtered_resps": text,
        "pope_accuracy": {"question_id": q.question_id, "score": float(text.lower() == q.label),
                          "prediction": text.lower(), "ground_truth": q.label},
    }) + "\n" for i, (q, text) in enumerate(zip(questions, answers))))
    assert pope.answers_from_lmms_samples(samples)[0] == {"question_id": questions[0].question_id, "text": answers[0]}
    assert cli.main(["score", "pope", "--lmms-samples", str(samples), "--labels", task["labels"]]) == 0
    scored = json.loads(capsys.readouterr().out)["mean"]
    assert scored["recall"] == 100.0 and scored["yes_ratio"] == 100.0  # the official parser: no "no" in it -> yes
