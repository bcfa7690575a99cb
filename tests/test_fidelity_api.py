"""Release settings made visible and API edges: shipped configs match the ids users type, each response's
diagnostics say which config and derived defaults it ran with, images are fitted as the releases do, an
image the model refuses is a 400 naming that image part, ``stop`` is limited as OpenAI does, and a row
batched over HTTP beside a row of the same method with other settings gets what it gets alone."""

from __future__ import annotations

import base64
import io
import threading

import pytest
from conftest import FAMILIES, make_image
from fastapi.testclient import TestClient
from PIL import Image

from seeright.service.api.app import create_app
from seeright.service.engine import Engine, GenerationRequest
from seeright.service.model_configs import ModelConfig, builtin_configs, find_model_config
from seeright.service.settings import Settings

HUB_IDS = {
    "llava-hf/llava-1.5-7b-hf": ("llava", "llava-1.5-7b"),
    "liuhaotian/llava-v1.5-7b": ("llava", "llava-1.5-7b"),
    "llava-hf/llava-1.5-13b-hf": ("llava", "llava-1.5-13b"),
    "Qwen/Qwen2-VL-2B-Instruct": ("qwen2_vl", "qwen2-vl-2b"),
    "Qwen/Qwen2-VL-7B-Instruct": ("qwen2_vl", "qwen2-vl-7b"),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen2_vl", "qwen2.5-vl-3b"),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2_vl", "qwen2.5-vl-7b"),
}

# a second setting of each method, different from the model's defaults
OTHER = {"var": {"rho": 0.8}, "vhr": {"alpha": 3.0}, "gift": {"enhance_layers": [2, 3, 4, 5], "saliency_layers": [1]},
         "carve": {"top_p": 0.4}}


@pytest.mark.parametrize("model_id", sorted(HUB_IDS))
def test_shipped_configs_match_the_ids_users_type(model_id):
    family, expected = HUB_IDS[model_id]
    assert find_model_config(model_id, family).name == expected
    matching = [c.name for c in builtin_configs() if c.family in (None, family) and any(m.lower() in model_id.lower() for m in c.match)]
    assert matching == [expected]  # exactly one config claims the id
    config = next(c for c in builtin_configs() if c.name == expected)
    for method, params in config.methods.items():
        for key, value in params.items():
            if key.endswith("layers"):
                assert all(0 <= layer < config.num_layers for layer in value), (expected, method, key)


def test_diagnostics_say_which_config_and_derived_defaults(engine):
    out = engine.generate_batch([GenerationRequest(prompt="Describe.", images=[make_image(0)], interventions={"gift": {"alpha": 2.0}},
                                                   max_new_tokens=2)])[0]
    gift = out.diagnostics["gift"]
    assert gift["model_config"] == engine.model_config.name and gift["params"]["alpha"] == 2.0
    assert gift["params"]["saliency_layers"] == engine.method_defaults("gift")["saliency_layers"]
    assert gift["derived"] == engine.derived_defaults("gift") == []  # the tiny configs give every layer list
    generic = Engine(engine.model, engine.tokenizer, engine.adapter.image_processor, "someone/new-llava",
                     ModelConfig(name="generic", family="llava"))
    assert generic.derived_defaults("gift") == ["enhance_layers", "saliency_layers"]  # no config values: derived
    with pytest.raises(ValueError, match="written for a 28-layer model"):
        Engine(engine.model, engine.tokenizer, engine.adapter.image_processor, "x",
               find_model_config("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl"))


def test_images_fitted_to_the_release_resolution():
    qwen = Engine.from_pretrained("tiny-random/qwen2-vl")
    qwen.adapter.image_processor.size = {"shortest_edge": 256, "longest_edge": 4096}  # a real processor's range
    big = make_image(1, size=(64, 48))
    fitted = qwen.adapter.fit_image(big, 1024)
    assert fitted.size != big.size and 256 <= fitted.width * fitted.height <= 1024
    assert qwen.adapter.fit_image(big, 4096) is big  # no tighter than the processor's own bound: unchanged
    tokens = {}
    for key, params in (("plain", None), ("fitted", {"max_pixels": 1024}), ("loose", {"max_pixels": 8192})):
        req = GenerationRequest(prompt="Describe.", images=[big], interventions={} if params is None else {"gift": params},
                                max_new_tokens=1)
        tokens[key] = qwen.generate_batch([req])[0].prompt_tokens
    assert tokens["fitted"] < tokens["plain"] == tokens["loose"]
    llava = Engine.from_pretrained("tiny-random/llava")
    assert llava.adapter.fit_image(big, 1024) is big  # fixed-size processors resize anyway


def _url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(image: Image.Image, text: str = "Describe the picture.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": _url(image)}}]}]


def test_refused_image_names_its_part_and_stop_is_limited():
    engine = Engine.from_pretrained("tiny-random/qwen2-vl")
    with TestClient(create_app(Settings(model="tiny-random/qwen2-vl"), engine)) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny-random/qwen2-vl", "messages": _messages(Image.new("RGB", (10000, 1)))})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[1]", r.text
        assert "aspect ratio" in r.json()["error"]["message"]
        body = {"model": "tiny-random/qwen2-vl", "messages": _messages(make_image(0)), "max_tokens": 2}
        r = client.post("/v1/chat/completions", json={**body, "stop": [f"s{i}" for i in range(5)]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
        assert client.post("/v1/chat/completions", json={**body, "stop": ["a", "b", "c", "d"]}).status_code == 200
        cards = {c["name"]: c for c in client.get("/v1/interventions").json()["data"]}
        assert all("derived" in card for card in cards.values())


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained("tiny-random/llava")


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_rows_of_one_method_equal_each_alone(family):
    engine = Engine.from_pretrained(family)
    settings = Settings(model=family, batch_wait_ms=300, max_batch_size=8)
    with TestClient(create_app(settings, engine)) as client:
        scheduler = client.app.state.scheduler
        for method, other in OTHER.items():
            bodies = [{"model": family, "messages": _messages(make_image(i)), "max_tokens": 4, "logprobs": True,
                       "interventions": {method: settings_}} for i, settings_ in enumerate(({}, other))]

            def post(body: dict) -> list[float]:
                r = client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                return [t["logprob"] for t in r.json()["choices"][0]["logprobs"]["content"]]

            alone = [post(b) for b in bodies]
            before = scheduler.batches
            together: list = [None, None]
            threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, post(bodies[i]))) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert scheduler.batches == before + 1, method  # both rows ran in one batch
            for a, b in zip(alone, together):
                assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, method
