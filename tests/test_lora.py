"""LoRA adapters per batch row: a row with adapter A equals the model with A merged by PEFT, alone; rows with other
adapters, none, and interventions beside it change nothing; an admitted request keeps its adapter when it is
unloaded; adapters the server cannot serve exactly are refused with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, make_image
from lora_folders import merged_engine, peft_adapter
from safetensors.torch import load_file, save_file

from seeright.interventions.lora import LoraError, LoraStacks
from seeright.service.batching import RunningBatch
from seeright.service.engine import Engine, GenerationOutput, GenerationRequest, RequestError

TOLERANCE = 1e-4
PROMPT = "Describe the picture."
CONFIGS = {
    "plain": {},
    "rslora-patterns": {"use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Adapter folders per (family, config), and a second adapter per family (``other``: another seed, rank and
    fewer modules, so a gathered product pads both the rank and the modules it leaves alone)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for family in FAMILIES:
        slug = family.replace("/", "-")
        for name, config in CONFIGS.items():
            out[family, name] = peft_adapter(family, root / f"{slug}-{name}", **config)
        out[family, "other"] = peft_adapter(family, root / f"{slug}-other", seed=1, r=6, lora_alpha=4,
                                            target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    return out


@pytest.fixture(scope="module")
def served(folders) -> dict[str, Engine]:
    """One engine per family serving every adapter of ``folders`` (named by config)."""
    engines = {}
    for family in FAMILIES:
        engine = Engine.from_pretrained(family)
        for (fam, name), folder in folders.items():
            if fam == family:
                engine.load_lora(name, folder)
        engines[family] = engine
    return engines


def request(image: int = 1, adapter: str | None = None, interventions: dict | None = None, **decoding) -> GenerationRequest:
    options = {"max_new_tokens": 6, "logprobs": True, **decoding}
    return GenerationRequest(prompt=PROMPT, images=[make_image(image)], adapter=adapter, interventions=interventions or {},
                             **options)


def same(a: GenerationOutput, b: GenerationOutput) -> None:
    assert a.token_ids == b.token_ids
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < TOLERANCE


def run_running(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationOutput]:
    """Requests joining a running batch one step apart (continuous batching's path)."""
    batch, rows, outputs = RunningBatch(engine), [], {}
    for r in requests:
        rows += batch.admit([r])
        outputs.update({id(row): batch.output(row) for row in batch.step()})
    while len(batch):
        outputs.update({id(row): batch.output(row) for row in batch.step()})
    return [outputs[id(row)] for row in rows]


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_row_equals_the_merged_model(served, folders, family, config):
    engine = served[family]
    merged = merged_engine(family, folders[family, config], engine)
    for image in (0, 1):
        reference = merged.generate_batch([request(image)])[0]
        assert reference.token_ids != engine.generate_batch([request(image)])[0].token_ids  # the adapter matters
        same(engine.generate_batch([request(image, config)])[0], reference)
        same(run_running(engine, [request(image, config)])[0], reference)


@pytest.mark.parametrize("copies", ["per-row", "gathered"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_rows_equal_each_row_alone(served, family, copies):
    """Both ways of stacking the rows' weights: a copy per row, or the adapters gathered per step (past the copies'
    memory budget)."""
    engine = served[family]
    engine.runtime.lora_stacks = LoraStacks(max_row_bytes=0 if copies == "gathered" else 128 << 20)
    batch = [
        request(0, "plain"), request(1, "other"), request(2), request(3, "plain", {"var": {}}),
        request(1, "other", {"vcd": {}}), request(0, None, {"pai": {}}), request(2, "rslora-patterns", {"vhr": {}}),
        request(3, "other", temperature=0.8, seed=7),
    ]
    alone = [engine.generate_batch([r])[0] for r in batch]
    for out, ref in zip(engine.generate_batch(batch), alone):
        same(out, ref)
    for out, ref in zip(run_running(engine, batch), alone):
        same(out, ref)


def _method_request(engine: Engine, name: str, adapter: str | None) -> GenerationRequest:
    params = {"preset": "fast"} if name == "vemask" else {}
    return request(2, adapter, {name: params}, max_new_tokens=4)


@pytest.mark.parametrize("name", ["var", "vhr", "gift", "carve", "pai", "paint", "vcd", "ritual", "vemask", "lookback",
                                  "lookback_decoding", "attention_map"])
def test_each_method_runs_on_the_adapted_model(served, folders, name):
    """A method with an adapter equals the method on the merged model: its analysis passes (VHR's text-only pass,
    GIFT's saliency, CARVE's collection generations), contrast branch and candidates all run on the adapted model."""
    family = "tiny-random/llava"
    engine = served[family]
    assert name in engine.runnable()
    merged = merged_engine(family, folders[family, "plain"], engine)
    same(engine.generate_batch([_method_request(engine, name, "plain")])[0],
         merged.generate_batch([_method_request(merged, name, None)])[0])


def test_an_admitted_request_keeps_its_adapter_when_it_is_unloaded(folders):
    family = "tiny-random/llava"
    engine = Engine.from_pretrained(family)
    engine.load_lora("a", folders[family, "plain"])
    reference = engine.generate_batch([request(1, "a", max_new_tokens=8)])[0]
    batch = RunningBatch(engine)
    [row] = batch.admit([request(1, "a", max_new_tokens=8)])
    batch.step()
    engine.unload_lora("a")
    while len(batch):
        batch.step()
    same(batch.output(row), reference)
    with pytest.raises(RequestError) as err:
        engine.generate_batch([request(1, "a")])
    assert err.value.field == "model"
    engine.load_lora("a", folders[family, "other"])  # the name is free again, for another adapter
    assert engine.generate_batch([request(1, "a")])[0].token_ids != reference.token_ids[:6]


def _rewrite_config(folder: Path, target: Path, **changes) -> Path:
    target.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text()) | changes
    (target / "adapter_config.json").write_text(json.dumps(config))
    (target / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    return target


def _rewrite_weights(folder: Path, target: Path, edit) -> Path:
    target.mkdir()
    (target / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file(edit(load_file(folder / "adapter_model.safetensors")), target / "adapter_model.safetensors")
    return target


def test_adapters_that_cannot_be_served_are_refused_with_the_field(folders, tmp_path):
    llava = Engine.from_pretrained("tiny-random/llava")
    good = folders["tiny-random/llava", "plain"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "adapter_config.json").write_text("{not json")
    cases = {
        "lora_path": [tmp_path / "missing", tmp_path / "empty", (tmp_path / "empty" / "file.txt")],
        "adapter_config.json": [tmp_path / "garbled"],
        "use_dora": [_rewrite_config(good, tmp_path / "dora", use_dora=True)],
        "bias": [_rewrite_config(good, tmp_path / "bias", bias="all")],
        "modules_to_save": [_rewrite_config(good, tmp_path / "saved", modules_to_save=["lm_head"])],
        "peft_type": [_rewrite_config(good, tmp_path / "ia3", peft_type="IA3")],
        "r": [_rewrite_config(good, tmp_path / "rank", rank_pattern={"q_proj": 3})],
        "base_model_name_or_path": [folders["tiny-random/qwen2-vl", "other"]],  # another architecture's shapes
        "target_modules": [peft_adapter("tiny-random/llava", tmp_path / "tower", target_modules=r".*vision_tower.*q_proj")],
        "weights.model.language_model.layers.0.self_attn.q_proj": [_rewrite_weights(
            good, tmp_path / "half", lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k})],
        "weights": [_rewrite_weights(good, tmp_path / "stray", lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(2, 2)})],
    }
    (tmp_path / "empty" / "file.txt").write_text("x")
    for field, paths in cases.items():
        for path in paths:
            with pytest.raises(LoraError) as err:
                llava.load_lora("x", path)
            assert err.value.field == field, (path, err.value)
    with pytest.raises(LoraError) as err:
        llava.load_lora("x", folders["tiny-random/llava", "other"], max_rank=4)  # rank 6
    assert err.value.field == "r"
    for name in ("", "a+b", "tiny-random/llava"):
        with pytest.raises(LoraError) as err:
            llava.load_lora(name, good)
        assert err.value.field == "lora_name"
    llava.load_lora("x", good)
    with pytest.raises(LoraError) as err:
        llava.load_lora("x", good)
    assert err.value.field == "lora_name"
    assert list(llava.loras) == ["x"]  # nothing refused was kept
