"""LoRA adapters over HTTP: listed in /v1/models, chosen by ``model`` (with presets), loaded and unloaded at run time in
vLLM's shapes by admin keys only; bad adapters are 400s naming the field and the server keeps serving."""

from __future__ import annotations

import pytest
from conftest import make_image
from fastapi.testclient import TestClient
from lora_folders import peft_adapter
from test_api import data_url, user

from seeright.service.api.app import create_app
from seeright.service.engine import Engine, GenerationRequest
from seeright.service.settings import Settings

MODEL = "tiny-random/llava"
ADMIN, USER = "admin-key", "user-key"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"first": peft_adapter(MODEL, root / "first"), "second": peft_adapter(MODEL, root / "second", seed=1, r=6),
            "qwen": peft_adapter("tiny-random/qwen2-vl", root / "qwen")}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def client(engine, adapters):
    settings = Settings(model=MODEL, adapters={"first": adapters["first"]}, runtime_adapters=True, max_adapters=2,
                        api_keys=[USER], admin_api_keys=[ADMIN], batch_wait_ms=5)
    with TestClient(create_app(settings, engine)) as c:
        yield c


def headers(key: str = USER) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(client: TestClient, model: str, **extra):
    body = {"model": model, "messages": user("Describe the picture.", data_url(make_image(1))), "max_tokens": 5,
            "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers())


def in_process(engine: Engine, adapter: str | None, interventions: dict | None = None) -> str:
    request = GenerationRequest(prompt="Describe the picture.", images=[make_image(1)], max_new_tokens=5, adapter=adapter,
                                interventions=interventions or {})
    return engine.generate_batch([request])[0].text


def test_adapters_are_models(client, engine, adapters):
    cards = {c["id"]: c for c in client.get("/v1/models", headers=headers()).json()["data"]}
    assert cards["first"]["parent"] == MODEL and cards["first"]["root"] == str(adapters["first"])
    assert cards[MODEL]["parent"] is None
    answer = chat(client, "first")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == in_process(engine, "first")
    assert answer.json()["model"] == "first"
    with_preset = chat(client, "first+var")
    assert with_preset.json()["choices"][0]["message"]["content"] == in_process(engine, "first", {"var": {}})
    assert in_process(engine, "first") != in_process(engine, None)
    missing = chat(client, "nobody+var")
    assert missing.status_code == 404 and "model" in missing.json()["error"]["message"]


def test_load_and_unload_at_run_time(client, engine, adapters):
    load = {"lora_name": "second", "lora_path": str(adapters["second"])}
    assert client.post("/v1/load_lora_adapter", json=load, headers=headers()).status_code == 403  # not an admin
    done = client.post("/v1/load_lora_adapter", json=load, headers=headers(ADMIN))
    assert done.status_code == 200 and "second" in done.text
    assert "second" in [c["id"] for c in client.get("/v1/models", headers=headers()).json()["data"]]
    assert chat(client, "second").json()["choices"][0]["message"]["content"] == in_process(engine, "second")
    again = client.post("/v1/load_lora_adapter", json=load, headers=headers(ADMIN))
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    full = client.post("/v1/load_lora_adapter", json={**load, "lora_name": "third"}, headers=headers(ADMIN))
    assert full.status_code == 400 and "max_adapters" in full.json()["error"]["message"]
    gone = client.post("/v1/unload_lora_adapter", json={"lora_name": "second"}, headers=headers(ADMIN))
    assert gone.status_code == 200
    assert chat(client, "second").status_code == 404
    unknown = client.post("/v1/unload_lora_adapter", json={"lora_name": "second"}, headers=headers(ADMIN))
    assert unknown.status_code == 404 and "lora_name" in unknown.json()["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"lora_name": "x", "lora_path": "/nowhere"}, "lora_path"),
    ({"lora_name": "x+y", "lora_path": "/nowhere"}, "lora_name"),
    ({"lora_name": MODEL, "lora_path": "/nowhere"}, "lora_name"),
    ({"lora_name": "x"}, "lora_path"),
    ({"lora_name": "x", "lora_path": "p", "extra": 1}, "extra"),
])
def test_bad_loads_are_400s_naming_the_field(client, body, param):
    answer = client.post("/v1/load_lora_adapter", json=body, headers=headers(ADMIN))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert chat(client, "first").status_code == 200  # still serving


def test_an_adapter_of_another_architecture_is_refused(client, adapters):
    answer = client.post("/v1/load_lora_adapter", json={"lora_name": "q", "lora_path": str(adapters["qwen"])},
                         headers=headers(ADMIN))
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "lora_path"
    assert "base_model_name_or_path" in answer.json()["error"]["message"]


def test_run_time_loading_is_off_by_default(engine, adapters):
    with TestClient(create_app(Settings(model=MODEL), engine)) as plain:
        answer = plain.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapters["first"])})
        assert answer.status_code == 403 and "--runtime-adapters" in answer.json()["error"]["message"]
