"""The two-engine comparison of the shapes testbed (``seeright.testbed.engine_agreement``): its figures, differences
and answer counts from two runs' results and answer files (the runs themselves need the vLLM environment)."""

from __future__ import annotations

import json
from pathlib import Path

from seeright.testbed import engine_agreement


def run_folder(root: Path, answers: dict[str, list[str]]) -> None:
    for row, texts in answers.items():
        folder = root / "runs" / "seed5-images2" / row
        folder.mkdir(parents=True)
        (folder / "pope.jsonl").write_text("".join(json.dumps({"key": f"random:{i}", "text": t}) + "\n" for i, t in enumerate(texts)))


def results(pope: dict[str, float], chair_i: dict[str, float]) -> dict:
    return {"seed": 5, "images": 2, "questions": {}, "methods": {
        label: {"pope": {"mean": {"accuracy": pope[label]}}, "chair": {"CHAIR_S": 10.0, "CHAIR_I": chair_i[label], "Recall": 80.0},
                "seconds": 3.0} for label in pope}}


def test_rows_compare_figures_and_answers(tmp_path):
    run_folder(tmp_path / "hf", {"baseline": ["Yes", "No"], "pai_cfg-true": ["Yes", "Yes"]})
    run_folder(tmp_path / "vllm", {"baseline": ["Yes", "No"], "pai_cfg-true": ["Yes", "No"]})
    hf = results({"baseline": 80.0, "pai cfg=true": 75.0}, {"baseline": 5.0, "pai cfg=true": 4.0})
    vl = results({"baseline": 80.0, "pai cfg=true": 74.5}, {"baseline": 5.0, "pai cfg=true": 4.25})
    result = engine_agreement.compare(hf, vl, tmp_path / "hf", tmp_path / "vllm")
    row = result["rows"]["pai cfg=true"]
    assert row["difference"] == {"POPE acc": -0.5, "CHAIR_S": 0.0, "CHAIR_I": 0.25, "Recall": 0.0}
    assert (row["same_answers"], row["answers"]) == (1, 2)
    assert (result["rows"]["baseline"]["same_answers"], result["rows"]["baseline"]["answers"]) == (2, 2)
    table = engine_agreement.markdown(result)
    assert "| pai cfg=true | 75.0 / 74.5 (-0.5) |" in table and "Largest difference: 0.50 points." in table
