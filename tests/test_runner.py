"""End-to-end benchmark runs on a tiny model: interrupted and resumed equals uninterrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_image

from seeright.cli import main
from seeright.eval import chair, pope, report, runner
from seeright.service.engine import EngineGenerator


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    names = {q.image for q in pope.builtin_questions("random")[:12]}
    ids = [json.loads(l)["image_id"] for l in (Path(__file__).parent / "data/chair_cca/coco_chair.jsonl").read_text().splitlines()[:4]]
    names |= {f"COCO_val2014_{i:012d}.jpg" for i in ids}
    for i, name in enumerate(sorted(names)):
        make_image(i).save(folder / name)
    return folder


class Interrupting:
    """Fails after ``budget`` predictions, like a killed job."""

    def __init__(self, inner, budget: int) -> None:
        self.inner, self.budget = inner, budget

    def generate(self, prompts, images, interventions, max_new_tokens):
        if self.budget < len(prompts):
            raise KeyboardInterrupt
        self.budget -= len(prompts)
        return self.inner.generate(prompts, images, interventions, max_new_tokens)


@pytest.mark.parametrize("benchmark", ["pope", "chair"])
def test_resumed_run_equals_uninterrupted(llava, image_dir, tmp_path, benchmark):
    gen = EngineGenerator(llava)
    if benchmark == "pope":
        items = runner.pope_items(pope.builtin_questions("random")[:12], image_dir, "llava")
    else:
        items = [it for it in runner.chair_items(image_dir) if it.record["image_id"] in chair.load_ground_truth()]
    full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    runner.run_items(items, gen, full, {"gift": {}}, 6, batch_size=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        runner.run_items(items, Interrupting(gen, 4), resumed, {"gift": {}}, 6, batch_size=4, progress=False)
    with resumed.open("a") as f:
        f.write('{"key": "torn')  # a write cut short by the kill
    assert 0 < len(runner.read_done(resumed)) < len(items)
    records = runner.run_items(items, gen, resumed, {"gift": {}}, 6, batch_size=4, progress=False)
    assert resumed.read_bytes() == full.read_bytes()
    assert len(records) == len(items)


def test_eval_cli_writes_metrics_report_and_plot(image_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "pope", "--model", "tiny-random/llava", "--images", str(image_dir), "--out", str(out), "--split", "random", "--limit", "6",
            "--intervention", "vhr:alpha=2.5", "--max-new-tokens", "4"]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"baseline", "vhr:alpha=2.5"}
    assert results["baseline"]["splits"]["random"]["n"] == 6
    assert (out / "report.md").read_text().count("| random |") == 2
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 0  # a rerun resumes: nothing left to predict, same metrics
    assert json.loads(capsys.readouterr().out) == results


def test_chair_eval_cli(image_dir, tmp_path, capsys):
    gt = tmp_path / "gt.json"
    ids = [chair.image_id_of(p.name) for p in image_dir.iterdir()]
    gt.write_text(json.dumps({str(i): ["dog", "person"] for i in ids}))
    assert main(["eval", "chair", "--model", "tiny-random/llava", "--images", str(image_dir), "--out", str(tmp_path / "c"), "--limit", "3",
                 "--gt", str(gt), "--max-new-tokens", "8"]) == 0
    metrics = json.loads(capsys.readouterr().out)["baseline"]
    assert metrics["n"] == 3 and 0 <= metrics["CHAIR_I"] <= 100
    assert "CHAIR_S" in (tmp_path / "c" / "report.md").read_text()
    assert report.markdown_table(["a"], [["1"]]).startswith("| a |")


def test_pope_eval_from_a_saved_lmms_lab_dataset(llava, image_dir, tmp_path):
    from datasets import Dataset

    questions = pope.builtin_questions("random")[:6]
    rows = [{"question_id": str(q.question_id), "question": q.question, "answer": q.label.capitalize(),
             "image_source": q.image.removesuffix(".jpg"), "category": "random"} for q in questions]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    spec = runner.BenchmarkSpec("pope", image_dir, ("random",), dataset=tmp_path / "ds", max_new_tokens=3)
    items = runner.benchmark_items(spec)
    assert [it.image.name for it in items] == [q.image for q in questions]
    metrics = runner.run_benchmark(spec, EngineGenerator(llava), tmp_path / "out.jsonl", {}, progress=False)
    assert metrics["splits"]["random"]["n"] == 6
