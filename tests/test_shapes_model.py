"""The packaged ``seeright/shapes-llava``: loads with no download, answers from the image, matches stock
generation with interventions off, and the results command runs end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from seeright.cli import main
from seeright.eval import runner
from seeright.service.engine import Engine, EngineGenerator
from seeright.testbed import results as shapes_results
from seeright.testbed import world as shapes

MODEL = "seeright/shapes-llava"


@pytest.fixture(scope="module")
def shapes_engine() -> Engine:
    return Engine.from_pretrained(MODEL)


def test_packaged_model_loads_with_its_config(shapes_engine):
    assert shapes_engine.model_config.name == "shapes-llava"
    assert shapes_engine.adapter.image_tokens_per_image() == 16


def test_answers_are_grounded_in_the_image(shapes_engine, shapes_bench):
    spec = shapes_results.specs(shapes_bench, batch_size=32)["pope"]
    spec = replace(spec, splits=("random",))
    metrics = runner.run_benchmark(spec, EngineGenerator(shapes_engine), shapes_bench / "run.jsonl", {}, progress=False)
    random_split = metrics["splits"]["random"]
    assert random_split["n"] >= 100
    assert random_split["accuracy"] >= 80  # a model that ignores the image sits near 50
    assert 30 <= random_split["yes_ratio"] <= 70


def test_captions_name_objects_in_the_image(shapes_engine, shapes_bench):
    spec = shapes_results.specs(shapes_bench, batch_size=32)["chair"]
    spec = replace(spec, limit=20)
    metrics = runner.run_benchmark(spec, EngineGenerator(shapes_engine), shapes_bench / "captions.jsonl", {}, progress=False)
    assert metrics["Recall"] >= 60 and metrics["CHAIR_I"] < 50


def test_interventions_off_is_stock_generation(shapes_engine):
    scene = shapes.generate_scenes(1, seed=5)[0]
    image = shapes.render(scene, 5)
    out = shapes_engine.generate(shapes.CAPTION_PROMPT, image=image, max_new_tokens=24)
    prompt = f"USER: {'<image>' * 16}\n{shapes.CAPTION_PROMPT} ASSISTANT:"
    inputs = shapes_engine.tokenizer(prompt, return_tensors="pt")
    pixels = shapes_engine.adapter.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        stock = shapes_engine.model.generate(**inputs, pixel_values=pixels, max_new_tokens=24, do_sample=False)
    expected = stock[0, inputs["input_ids"].shape[1] :].tolist()
    assert out.token_ids == expected[: len(out.token_ids)]
    assert len(out.token_ids) == len(expected) or expected[len(out.token_ids)] == shapes_engine.tokenizer.eos_token_id


def test_results_command_writes_the_table(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["eval", "shapes", "--out", str(out), "--images", "12", "--seed", "3", "--only", "baseline", "vhr"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.count("\n| baseline |") == 1 and table.count("\n| vhr |") == 1
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"baseline", "vhr"}
    assert results["methods"]["vhr"]["pope"]["splits"]["adversarial"]["n"] == results["questions"]["adversarial"]
    gap = results["methods"]["baseline"]["pope"]["adversarial_gap"]
    splits = results["methods"]["baseline"]["pope"]["splits"]
    assert gap["points"] == pytest.approx(splits["random"]["accuracy"] - splits["adversarial"]["accuracy"], abs=0.05)
    intervals = results["methods"]["baseline"]["pope"]["interval95"]
    assert set(intervals) == {"random", "popular", "adversarial"}
    assert min(intervals.values()) >= 0 and gap["interval95"] >= 0
    gain = results["methods"]["vhr"]["pope"]["gain_vs_baseline"]
    vhr_acc = sum(results["methods"]["vhr"]["pope"]["splits"][s]["accuracy"] for s in intervals) / 3
    base_acc = sum(splits[s]["accuracy"] for s in intervals) / 3
    assert gain["points"] == pytest.approx(vhr_acc - base_acc, abs=0.05) and gain["interval95"] >= 0
    assert (out / "results.md").read_text() + "\n" == table
    assert main([*argv[:-2], "no-such-row"]) == 2  # an unknown --only label is an error, not an empty table
    assert "only: unknown rows ['no-such-row']" in capsys.readouterr().err


def test_inspection_measures_sinks_and_vision_aware_heads(shapes_engine):
    from seeright.testbed.inspection import inspect

    attention = shapes_engine.model.config.text_config._attn_implementation
    result = inspect(shapes_engine, n=4, seed=1, tau=4.0)
    assert result["samples"] == 4 and len(result["layers"]) == 4
    for layer in result["layers"]:
        assert len(layer["vhd"]) == 4 and all(v > 0 for v in layer["vhd"])  # the image changes every head
        assert all(0 < a < 1 for a in layer["image_attention"])
        assert 0 < layer["top_dims"][0]["max_xhat"] <= result["max_possible_xhat"]
    assert shapes_engine.model.config.text_config._attn_implementation == attention  # restored afterwards
