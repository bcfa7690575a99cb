"""Results as data: the manual's tables are what their records render, and records say where they came from."""

from __future__ import annotations

import json
from pathlib import Path

from seeright import cli
from seeright.tools import records, render

ROOT = Path(__file__).resolve().parents[1]


def test_every_table_in_the_manual_is_what_its_records_render() -> None:
    assert render.pages(ROOT / "docs"), "no results block found"
    assert render.check(ROOT / "docs", ROOT / "results") == []


def test_the_readme_is_rendered_too() -> None:
    assert ROOT / "README.md" in render.pages(ROOT / "docs")


def _page(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "page.md"
    page.write_text("Before.\n\n<!-- results: score answers.jsonl -->\n<!-- /results -->\n\nAfter.\n")
    return page


def test_a_measurement_writes_a_record_that_renders_and_a_hand_edit_is_caught(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    labels = tmp_path / "coco_pope_random.json"
    answers.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n" for i, t in enumerate(["Yes", "No", "yes"])))
    labels.write_text("".join(json.dumps({"question_id": i, "image": f"{i}.jpg", "text": "Is there a cat?", "label": l}) + "\n" for i, l in enumerate(["yes", "yes", "no"])))
    results = tmp_path / "results"
    assert cli.main(["score", "pope", "--answers", str(answers), "--labels", str(labels), "--results", str(results)]) == 0
    (path,) = (results / "score").glob("*.json")
    record = records.load(path)
    assert record.command.startswith("seeright score pope --answers") and record.machine["cores"] >= 1
    assert record.date and record.values["benchmark"] == "pope"

    page = _page(tmp_path)
    assert render.check(tmp_path / "docs", results), "an empty block must count as stale"
    assert render.render(tmp_path / "docs", results) == [page]
    text = page.read_text()
    assert "| random | 3 | 1 | 1 | 0 | 1 | 33.33 |" in text and record.caption() in text
    assert text.startswith("Before.") and text.endswith("After.\n")
    assert render.check(tmp_path / "docs", results) == []

    page.write_text(text.replace("33.33", "66.67"))  # a figure typed over by hand
    assert render.check(tmp_path / "docs", results) == [f"{page}: score answers.jsonl"]


def test_a_rerun_supersedes_and_a_missing_record_is_reported(tmp_path: Path) -> None:
    results = tmp_path / "results"
    first = {"benchmark": "chair", "metrics": {"CHAIR_S": 10.0, "CHAIR_I": 5.0, "Recall": 80.0, "Len": 20.0, "n": 4}}
    records.write("score", "answers.jsonl", first, ["score", "chair"], results)
    page = _page(tmp_path)
    render.render(tmp_path / "docs", results)
    assert "| 4 | 10.0 | 5.0 | 80.0 | 20.0 |" in page.read_text()
    older = json.loads(next((results / "score").glob("*.json")).read_text())
    newer = {**older, "date": "2999-01-01T00:00:00+00:00", "values": {**first, "metrics": {**first["metrics"], "CHAIR_I": 4.0}}}
    (results / "score" / "later.json").write_text(json.dumps(newer))
    assert render.check(tmp_path / "docs", results) == [f"{page}: score answers.jsonl"]
    render.render(tmp_path / "docs", results)
    assert "| 4 | 10.0 | 4.0 | 80.0 | 20.0 |" in page.read_text()
    page.write_text(page.read_text().replace("answers.jsonl", "gone.jsonl"))
    assert "gone.jsonl" in render.check(tmp_path / "docs", results)[0]
