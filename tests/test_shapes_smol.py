"""``seeright/shapes-smol``: SmolLM2-135M-Instruct assembled with the trained vision parts at load time. It keeps
the language model's chat, answers shapes questions from the image, in lmms-eval's prompt format too, and with
interventions off equals stock generation through SmolLM2's own chat template."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from seeright.eval import runner
from seeright.model_zoo import resolve_model_path, shapes_smol
from seeright.model_zoo.tiny_random import tiny_llava
from seeright.service.engine import Engine, EngineGenerator
from seeright.testbed import chat_prompts
from seeright.testbed import results as shapes_results
from seeright.testbed import world as shapes
from seeright.testbed.train import right_padded
from seeright.testbed.train_smol import LMMS_SUFFIX, group_loss

MODEL = "seeright/shapes-smol"


@pytest.fixture(scope="module")
def smol() -> Engine:
    return Engine.from_pretrained(MODEL)


def test_assembled_from_the_gguf_language_model_and_the_trained_parts(smol):
    assert smol.model_config.name == "shapes-smol"
    assert smol.info.num_layers == 30 and smol.info.hidden_size == 576 and smol.info.num_kv_heads == 3
    assert smol.adapter.image_tokens_per_image() == 16
    assert (shapes_smol.cache_dir() / "model.safetensors").is_file()  # the dequantised weights are cached


def test_the_first_dequantisation_gives_the_cached_model_without_its_gguf_quantization(tmp_path, monkeypatch):
    # a model assembled around the GGUF-loaded one passed its quantization entry on to its export, which vLLM refuses
    monkeypatch.setenv("SEERIGHT_CACHE", str(tmp_path))
    first, _ = shapes_smol.language_model()  # dequantised from the GGUF file now
    again, _ = shapes_smol.language_model()  # read from the cache
    assert shapes_smol.cache_dir().is_relative_to(tmp_path)
    assert "quantization_config" not in first.config.to_dict()
    assert first.config.to_dict() == again.config.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_is_the_default_of_serve_and_generate():
    from seeright.cli import build_parser
    from seeright.service.settings import Settings

    assert Settings().model == MODEL
    assert build_parser().parse_args(["generate", "--prompt", "hi"]).model == MODEL


def test_keeps_the_language_models_chat(smol):  # a held-out prompt (testbed/chat_prompts.py), never trained on
    assert "Paris" in smol.generate("What is the capital of France?", max_new_tokens=12).text


def test_chat_is_held_out_of_training_and_each_group_of_rows_has_its_own_mean_loss():
    assert not set(chat_prompts.HELD_OUT) & set(chat_prompts.TRAIN) and "What is the capital of France?" in chat_prompts.HELD_OUT
    model = tiny_llava()[0].eval()
    ids = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    labels = [[-100, -100, 7, 8, 9, 10], [-100, 12, 13], [-100, -100, 16, 17]]
    batch = right_padded(ids, labels, pad=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(group_loss(logits, batch["labels"], slice(None)), model(**batch).loss, atol=1e-6)
    chat = right_padded(ids[1:], labels[1:], pad=0)  # the chat rows alone: the same mean as within the batch
    assert torch.allclose(group_loss(logits, batch["labels"], slice(1, None)), model(**chat).loss, atol=1e-5)


def test_answers_from_the_image_in_both_prompt_formats(smol, shapes_bench):
    spec = replace(shapes_results.specs(shapes_bench, batch_size=32)["pope"], splits=("random",))
    plain = runner.run_benchmark(spec, EngineGenerator(smol), shapes_bench / "plain.jsonl", {}, progress=False)["splits"]["random"]
    items = runner.benchmark_items(spec)
    lmms = [replace(it, prompt=it.prompt + LMMS_SUFFIX) for it in items]
    records = runner.run_items(lmms, EngineGenerator(smol), shapes_bench / "lmms.jsonl", {}, 4, 32, progress=False)
    words = [r["text"].strip().split()[0].strip(".,").lower() if r["text"].strip() else "" for r in records]
    # A model that ignores the image sits near 50; 138 questions of 40 scenes put a 95% interval of about +-7 points
    # around the model's 87-88 on 500 scenes (README), so 75 is a floor that sampling noise does not reach.
    assert plain["n"] >= 100 and plain["accuracy"] >= 75, plain
    assert sum(w in ("yes", "no") for w in words) >= 0.95 * len(words)  # it answers, it does not caption


def test_interventions_off_is_stock_generation_through_the_chat_template(smol):
    scene = shapes.generate_scenes(1, seed=5)[0]
    image = shapes.render(scene, 5)
    out = smol.generate(shapes.CAPTION_PROMPT, image=image, max_new_tokens=16)
    messages = [{"role": "user", "content": "<image>\n" + shapes.CAPTION_PROMPT}]
    text = smol.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = text.replace("<image>", "<image>" * 16)
    inputs = smol.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    pixels = smol.adapter.image_processor([image], return_tensors="pt")["pixel_values"]
    stock = shapes_smol.build(Path(resolve_model_path(MODEL)))[0]
    with torch.no_grad():
        ids = stock.generate(**inputs, pixel_values=pixels, max_new_tokens=16, do_sample=False)
    assert out.token_ids == ids[0, inputs["input_ids"].shape[1]:].tolist()


def test_var_finds_visual_sinks_in_most_edited_layers(smol):
    """With the model config's tau, a minority of the image tokens are sinks in most edited layers (a layer where
    every image token is a sink, or none, leaves VAR nothing to move)."""
    scene = shapes.generate_scenes(1, seed=11)[0]
    out = smol.generate("Is there a circle in the image?", image=shapes.render(scene, 11), max_new_tokens=2,
                        interventions={"var": {}})
    var = out.diagnostics["var"]
    layers = var["params"]["layers"]
    partial = [l for l in layers if 0 < var["visual_sinks"][l] < smol.adapter.image_tokens_per_image()]
    assert len(partial) >= len(layers) / 2, var["visual_sinks"]
    assert all(len(var["sink_tokens"][l]) == var["visual_sinks"][l] for l in layers)


def test_ships_its_own_lookback_lens_detector(smol):
    """The detector of testbed/tables/shapes-smol-lookback-lens.json is the model's default: 30 x 9 weights."""
    params = smol.resolve_params({"lookback": {}})["lookback"]
    assert len(params.detector_weights) == 30 * 9
    scene = shapes.generate_scenes(1, seed=6)[0]
    out = smol.generate(shapes.CAPTION_PROMPT, image=shapes.render(scene, 6), max_new_tokens=8,
                        interventions={"lookback": {"window": 1}})
    probs = out.diagnostics["lookback"]["hallucination_probability"]
    assert len(probs) == len(out.token_ids) - 1 and all(0 < p < 1 for p in probs)


def test_the_shipped_sentinel_adapter_loads_and_is_served_per_row(smol):
    """``model_zoo/shapes-smol-sentinel`` (``python -m seeright.testbed.train_sentinel``) is a PEFT folder of this
    model: it loads, and a row on it beside a base row changes only its own answer."""
    import seeright.model_zoo
    from seeright.service.engine import GenerationRequest

    folder = Path(seeright.model_zoo.__file__).parent / "shapes-smol-sentinel"
    training = json.loads((folder / "training.json").read_text())
    assert training["settings"]["model"] == MODEL and training["counts"]["pairs"] > 0
    lora = smol.load_lora("sentinel-test", folder)
    try:
        assert lora.rank == training["settings"]["rank"]
        scenes = shapes.generate_scenes(4, seed=5)
        requests = [GenerationRequest(prompt=shapes.CAPTION_PROMPT, images=[shapes.render(s, 5)], max_new_tokens=24,
                                      logprobs=True, adapter=adapter) for s in scenes for adapter in (None, "sentinel-test")]
        together = smol.generate_batch(requests)
        alone = [smol.generate_batch([r])[0] for r in requests]
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]
        base, adapted = together[0::2], together[1::2]
        assert any(a.logprobs != b.logprobs for a, b in zip(adapted, base))
    finally:
        smol.unload_lora("sentinel-test")


DEV_SEED = 7  # the development seed the defaults were tuned on (testbed/tune_defaults.py); no reported table uses it


def test_no_method_at_its_defaults_answers_empty_or_costs_pope_accuracy(smol, tmp_path):
    """A user ticking a method on the default model gets it at settings that suit the model: on development-seed
    scenes, no empty caption or answer, and POPE accuracy not below the baseline's beyond its paired interval."""
    names = [n for n in smol.runnable() if not smol.methods[n].signal]
    rows = (("baseline", {}), *((name, {name: {}}) for name in names))
    results = shapes_results.run(EngineGenerator(smol), tmp_path, DEV_SEED, 8, rows, 16, log=lambda message: None)
    failures = []
    for label, row in results["methods"].items():
        empty = row["pope"]["empty_answers"] + row["chair"]["empty_answers"]
        gain = row["pope"].get("gain_vs_baseline", {"points": 0.0, "interval95": 0.0})
        if empty or gain["points"] + gain["interval95"] < 0:
            failures.append(f"{label}: {empty} empty answers, POPE {gain['points']:+.1f} ±{gain['interval95']:.1f}")
    assert not failures
