"""Per-row batching, no state between requests, validation errors, loading from a folder, sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTIONS

from seeright.interventions.registry import MethodRegistry
from seeright.service.engine import Engine, GenerationRequest, RequestError

MIXED = [{}, {"var": {}}, {"vhr": {}}, {"gift": {}}, {"gift": {"alpha": 3.0}, "vhr": {"alpha": 1.5}}]


def _requests(images, interventions, max_new_tokens=8):
    return [
        GenerationRequest(prompt=QUESTIONS[i % 4], images=[images[i % 4]], interventions=iv, max_new_tokens=max_new_tokens)
        for i, iv in enumerate(interventions)
    ]


def test_mixed_batch_rows_equal_rows_alone(engine, images):
    reqs = _requests(images, MIXED)
    batched = engine.generate_batch(reqs)
    for req, out in zip(reqs, batched):
        alone = engine.generate_batch([req])[0]
        assert out.token_ids == alone.token_ids, req.interventions
    assert len({tuple(o.token_ids) for o in batched}) > 1


@pytest.mark.parametrize("rows", [[{}, {"carve": {}}, {"gift": {}}], [{}, {"vemask": {"mask_ratio": 0.5}}, {"vcd": {}}, {"vemask": {}}]])
def test_pass_running_rows_in_a_mixed_batch(llava, images, rows):
    reqs = _requests(images, rows)
    batched = llava.generate_batch(reqs)
    assert [o.token_ids for o in batched] == [llava.generate_batch([r])[0].token_ids for r in reqs]


def test_no_state_leaks_between_requests(images):
    used, fresh = Engine.from_pretrained("tiny-random/llava"), Engine.from_pretrained("tiny-random/llava")
    used.generate_batch(_requests(images, [{"var": {}}, {"gift": {}}, {"vhr": {}}]))
    used.generate_batch(_requests(images, [{"vcd": {"seed": 3}}, {"paint": {"cfg": True}}, {"ritual": {}, "lookback": {}}]))
    used.generate_batch(_requests(images, [{"vemask": {"mask_ratio": 0.5}}, {}]))
    second = _requests(images[1:], [{"var": {"p": 0.9}}, {"vhr": {}}, {"vcd": {}}])
    assert [o.token_ids for o in used.generate_batch(second)] == [o.token_ids for o in fresh.generate_batch(second)]
    assert used.runtime.context is None


@pytest.mark.parametrize(
    "interventions,field",
    [
        ({"var": {"rho": 1.5}}, "interventions.var.rho"),
        ({"var": {"p": -0.1}}, "interventions.var.p"),
        ({"var": {"tau": 0}}, "interventions.var.tau"),
        ({"var": {"sink_dims": [10_000]}}, "interventions.var"),
        ({"var": {"layers": [99]}}, "interventions.var"),
        ({"vhr": {"alpha": -1}}, "interventions.vhr.alpha"),
        ({"vhr": {"prefill_positions": "some"}}, "interventions.vhr.prefill_positions"),
        ({"vhr": {"bogus": 1}}, "interventions.vhr.bogus"),
        ({"gift": {"head_fraction": 0}}, "interventions.gift.head_fraction"),
        ({"gift": {"enhance_layers": [-1]}}, "interventions.gift"),
        ({"carve": {"top_p": 2}}, "interventions.carve.top_p"),
        ({"carve": {"steps": "middle"}}, "interventions.carve.steps"),
        ({"pai": {"alpha": 3}}, "interventions.pai.alpha"),
        ({"pai": {"layers": [6]}}, "interventions.pai"),
        ({"paint": {"local_token_ratio": 0}}, "interventions.paint.local_token_ratio"),
        ({"vcd": {"noise_step": 1000}}, "interventions.vcd.noise_step"),
        ({"vcd": {"beta": 0}}, "interventions.vcd.beta"),
        ({"ritual": {"transform": "invert"}}, "interventions.ritual.transform"),
        ({"vcd": {}, "ritual": {}}, "interventions"),
        ({"lookback": {"detector_weights": [1.0, 2.0]}}, "interventions.lookback"),
        ({"lookback": {"detector_weights": [0.5] * 48}}, "interventions.lookback"),  # no detector_convention
        ({"vemask": {"mask_ratio": 1}}, "interventions.vemask.mask_ratio"),
        ({"vemask": {"epsilon": 0}}, "interventions.vemask.epsilon"),
        ({"vemask": {"mask_layers": [1]}}, "interventions.vemask"),
        ({"vemask": {"attack_layer": 3}}, "interventions.vemask"),
        ({"nope": {}}, "interventions"),
        ({"gift": 3}, "interventions.gift"),
    ],
)
def test_out_of_range_parameters_are_rejected(llava, images, interventions, field):
    with pytest.raises(RequestError) as info:
        llava.generate_batch(_requests(images, [interventions]))
    assert info.value.field == field
    assert field in str(info.value)


def test_decoding_errors_name_the_field(llava, images):
    for kwargs, field in (({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")):
        req = GenerationRequest(prompt="hi", images=[images[0]], **kwargs)
        with pytest.raises(RequestError, match=field):
            llava.generate_batch([req])


@pytest.mark.parametrize("name", [n for n in MethodRegistry.builtin() if n != "agser"])  # AGSER splits a text question
def test_methods_need_an_image(llava, name):
    with pytest.raises(RequestError, match=f"interventions.{name}: needs .*image"):
        llava.generate("hello", interventions={name: {}}, max_new_tokens=2)


def test_carve_needs_exactly_one_image(llava, images):
    with pytest.raises(RequestError, match="exactly one image"):
        llava.generate("hello", images=images[:2], interventions={"carve": {}}, max_new_tokens=2)


@pytest.mark.parametrize("name", ["tiny-random/llava", "tiny-random/qwen2-vl"])
def test_saved_folder_reloads_through_the_same_path(tmp_path, images, name):
    engine = Engine.from_pretrained(name)
    engine.save_pretrained(tmp_path)
    reloaded = Engine.from_pretrained(str(tmp_path))
    assert type(reloaded.model) is type(engine.model)
    assert reloaded.model_config.name == engine.model_config.name
    reqs = _requests(images, [{}, {"var": {}}, {"gift": {}}])
    assert [o.token_ids for o in reloaded.generate_batch(reqs)] == [o.token_ids for o in engine.generate_batch(reqs)]


def test_a_saved_llava_tower_is_in_the_hub_layout(tmp_path):
    """What vLLM's LLaVA loader reads (``vision_tower.vision_model.*``, as llava-hf checkpoints), and what reloads."""
    from safetensors import safe_open

    Engine.from_pretrained("tiny-random/llava").save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        tower = [k for k in saved.keys() if "vision_tower" in k]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)


def test_a_weightless_engine_loads_the_tower_alone_and_runs_it_as_the_full_model(tmp_path, images):
    """``load_tower`` (the vLLM client's copy of the tower): only the tower and projector get weights, read from
    the hub layout, and the tower passes and image embeddings are the full engine's, masks included."""
    full = Engine.from_pretrained("tiny-random/llava")
    full.save_pretrained(tmp_path)
    light = Engine.weightless(str(tmp_path))
    assert light.load_tower("cpu", "float32")
    assert all(p.is_meta for p in light.adapter.language_model.parameters())
    pixels = full.adapter.image_inputs(images[:2])[0]
    for got, want in zip(light.adapter.cls_attention(pixels), full.adapter.cls_attention(pixels)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    keep = torch.ones((2, full.info.vision_layers, full.adapter.image_tokens_per_image() + 1), dtype=torch.bool)
    keep[0, -1, 3] = False
    features = []
    for engine in (light, full):
        handles = engine.adapter.mask_vision_attention(keep, "outputs")
        features.append(engine.adapter.image_features(pixels["pixel_values"]))
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(features[0], features[1], rtol=0, atol=0)
    assert not torch.equal(features[0], full.adapter.image_features(pixels["pixel_values"]))  # the mask mattered
    assert Engine.from_pretrained("tiny-random/qwen2-vl").adapter.tower_modules == {}  # not named: refused on vLLM


def test_sampling_is_seeded_per_row(llava, images):
    req = GenerationRequest(prompt="hi", images=[images[0]], temperature=1.0, top_p=0.9, seed=7, max_new_tokens=10)
    other = GenerationRequest(prompt="hi", images=[images[0]], temperature=1.0, seed=8, max_new_tokens=10)
    a = llava.generate_batch([req])[0].token_ids
    assert llava.generate_batch([other, req])[1].token_ids == a
    assert llava.generate_batch([other])[0].token_ids != a


@pytest.mark.parametrize("tiny", [{"temperature": 1e-30}, {"temperature": 5e-324}, {"top_p": 1e-50}])
def test_a_tiny_temperature_or_top_p_samples_the_argmax(llava, images, tiny):
    """Scores over a denormal temperature are inf / inf (NaN) unless shifted first, and a top_p that is 0 in float32
    dropped every token: the draw is now the argmax, on the static path and in the running batch (a guided-decoding
    request samples there)."""
    greedy = llava.generate("hi", image=images[0], max_new_tokens=6).token_ids
    decoding = {"temperature": 1.0, **tiny} if "top_p" in tiny else tiny  # top_p alone keeps the top token
    assert llava.generate("hi", image=images[0], max_new_tokens=6, seed=1, **decoding).token_ids == greedy
    guided = {"lookback_decoding": {"candidates": 2, "chunk_tokens": 3, **decoding}}
    assert llava.generate("hi", image=images[0], max_new_tokens=6, interventions=guided).token_ids == greedy


def test_stop_strings_and_token_budget(llava, images):
    base = llava.generate("hi", image=images[0], max_new_tokens=12)
    assert base.finish_reason == "length" and len(base.token_ids) == 12
    stop = base.text[3:5]
    out = llava.generate("hi", image=images[0], max_new_tokens=12, stop=(stop,))
    assert out.finish_reason == "stop" and stop not in out.text and base.text.startswith(out.text)


def test_streaming_callback_sees_every_token(llava, images):
    seen: dict[int, list[int]] = {}
    reqs = _requests(images, [{}, {"gift": {}}], max_new_tokens=5)
    outs = llava.generate_batch(reqs, on_token=lambda row, tok: seen.setdefault(row, []).append(tok))
    assert [seen[0], seen[1]] == [o.token_ids for o in outs]
