"""The HTTP service through the OpenAI SDK and raw HTTP: completions, streaming, presets, errors, concurrency."""

from __future__ import annotations

import base64
import gc
import io
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import make_image
from fastapi.testclient import TestClient
from PIL import Image

from seeright.interventions.registry import MethodRegistry
from seeright.service.api.app import create_app
from seeright.service.engine import Engine, GenerationRequest
from seeright.service.settings import Settings

MODEL = "tiny-random/llava"


def data_url(image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    make_image(3).save(root / "ok.png")
    (root / "notes.txt").write_text("not an image")
    outside = tmp_path_factory.mktemp("outside")
    make_image(4).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    return root, outside


@pytest.fixture(scope="module")
def client(engine, folder):
    settings = Settings(model=MODEL, allowed_image_dir=folder[0], max_tokens_limit=64, max_images_per_request=2,
                        max_image_bytes=200_000, max_image_pixels=512 * 512, batch_wait_ms=20)
    with TestClient(create_app(settings, engine)) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)


@pytest.fixture(scope="module")
def image_url():
    return data_url(make_image(0))


def alone(engine, text, interventions, max_tokens=8):
    req = GenerationRequest(prompt=text, images=[make_image(0)], interventions=interventions, max_new_tokens=max_tokens)
    return engine.generate_batch([req])[0]


def test_completion_matches_engine_and_counts_usage(sdk, engine, image_url):
    resp = sdk.chat.completions.create(model=MODEL, messages=user("Is there a dog?", image_url), max_tokens=8)
    ref = alone(engine, "Is there a dog?", {})
    assert resp.choices[0].message.content == ref.text
    assert resp.usage.completion_tokens == len(ref.token_ids) and resp.usage.prompt_tokens == ref.prompt_tokens
    assert resp.usage.total_tokens == ref.prompt_tokens + len(ref.token_ids)
    assert resp.choices[0].finish_reason == "length"


def test_interventions_by_extra_body_and_by_preset(sdk, engine, image_url):
    by_body = sdk.chat.completions.create(model=MODEL, messages=user("Is there a dog?", image_url), max_tokens=8,
                                          extra_body={"interventions": {"gift": {}, "vhr": {"alpha": 2.5}}})
    assert by_body.choices[0].message.content == alone(engine, "Is there a dog?", {"gift": {}, "vhr": {"alpha": 2.5}}).text
    by_preset = sdk.chat.completions.create(model=f"{MODEL}+gift", messages=user("Is there a dog?", image_url), max_tokens=8)
    assert by_preset.choices[0].message.content == alone(engine, "Is there a dog?", {"gift": {}}).text
    assert by_preset.choices[0].message.content != alone(engine, "Is there a dog?", {}).text


def test_streaming_chunks_done_and_usage(sdk, client, engine, image_url):
    stream = sdk.chat.completions.create(model=MODEL, messages=user("Describe it.", image_url), max_tokens=10, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"interventions": {"var": {}}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref = alone(engine, "Describe it.", {"var": {}}, max_tokens=10)
    assert text == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    raw = client.post("/v1/chat/completions", json={"model": MODEL, "messages": user("Hi", image_url), "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_system_prompt_stop_and_seeded_sampling(sdk, image_url):
    msgs = [{"role": "system", "content": "Be brief."}, *user("Describe it.", image_url)]
    a = sdk.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0.9, top_p=0.9, seed=3)
    b = sdk.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0.9, top_p=0.9, seed=3)
    assert a.choices[0].message.content == b.choices[0].message.content
    full = sdk.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12).choices[0].message.content
    stop = full[4:6]
    cut = sdk.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content


def test_models_interventions_health_metrics(client, sdk):
    ids = [m.id for m in sdk.models.list().data]
    assert MODEL in ids and f"{MODEL}+gift" in ids
    info = client.get("/v1/interventions").json()
    names = {d["name"]: d for d in info["data"]}
    assert set(names) == set(MethodRegistry.builtin())
    assert names["var"]["parameters"]["properties"]["rho"]["maximum"] == 1
    assert names["var"]["defaults"]["tau"] == 4.0
    assert client.get("/health").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    assert "seeright_requests_total" in metrics and "seeright_queue_depth" in metrics
    assert 'seeright_intervention_requests_total{method="gift"}' in metrics


BAD = [
    ({"messages": "nope"}, "messages"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"n": 99}, "n"),  # n > 1 is served (issue 12); over the limit is refused
    ({"temperature": -1}, "temperature"),
    ({"interventions": {"dola": {}}}, "interventions"),
    ({"interventions": {"var": {"rho": 3}}}, "interventions.var.rho"),
    ({"interventions": {"gift": {"enhance_layers": [99]}}}, "interventions.gift"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
]


@pytest.mark.parametrize("patch,param", BAD)
def test_bad_input_is_a_4xx_naming_the_field(client, image_url, patch, param):
    body = {"model": MODEL, "messages": user("Is there a dog?", image_url), "max_tokens": 4, **patch}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)
    assert client.get("/health").status_code == 200


def _image_error(client, url):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": user("hi", url), "max_tokens": 2})
    return r.status_code, r.json()["error"]


def test_bad_images_are_refused(client, folder, image_url):
    root, outside = folder
    big = make_image(1, size=(600, 600))
    cases = [
        "data:image/png;base64,@@@notbase64",
        "data:image/png;base64," + base64.b64encode(b"plain text, not pixels").decode(),
        data_url(big),  # over the byte limit
        data_url(Image.new("RGB", (2000, 2000))),  # few bytes, over the pixel limit (a decompression bomb's shape)
        str(root / "notes.txt"),
        str(outside / "secret.png"),
        "../" + outside.name + "/secret.png",
        str(root / "link.png"),  # a symlink out of the folder
        "http://127.0.0.1:1/x.png",  # remote off
        "ftp://example.com/x.png",
    ]
    messages = []
    for url in cases:
        status, err = _image_error(client, url)
        assert status == 400 and err["param"].startswith("messages[0].content[0]"), (url, err)
        messages.append(err["message"])
    assert any("bytes" in m for m in messages) and any("pixels" in m for m in messages)
    for url in (str(root / "ok.png"), "file://" + str(root / "ok.png"), "ok.png"):
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": user("hi", url), "max_tokens": 2})
        assert r.status_code == 200, (url, r.text)


def test_too_many_images_and_wrong_model(client, image_url):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": user("hi", *[image_url] * 3), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": user("hi", image_url)})
    assert r.status_code == 404


def test_malformed_json_and_oversized_body(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = client.post("/v1/chat/completions", content=b"x" * (21 * 1024 * 1024), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_keys(engine, image_url):
    with TestClient(create_app(Settings(model=MODEL, api_keys=["k1", "k2"]), engine)) as c:
        body = {"model": MODEL, "messages": user("hi", image_url), "max_tokens": 2}
        assert c.post("/v1/chat/completions", json=body).status_code == 401
        assert c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.get("/health").status_code == 200  # health stays open for probes


def test_concurrent_requests_with_different_interventions(sdk, engine, image_url):
    plans = [{}, {"var": {}}, {"vhr": {}}, {"gift": {}}, {"gift": {"alpha": 2.0}}, {"vhr": {"alpha": 3.0}}]

    def send(iv):
        return sdk.chat.completions.create(model=MODEL, messages=user("Is there a dog?", image_url), max_tokens=8,
                                           extra_body={"interventions": iv}).choices[0].message.content

    with ThreadPoolExecutor(len(plans)) as pool:
        texts = list(pool.map(send, plans))
    assert texts == [alone(engine, "Is there a dog?", iv).text for iv in plans]


def test_full_queue_answers_503_with_retry_after(engine, image_url):
    settings = Settings(model=MODEL, queue_size=1, max_batch_size=1)
    app = create_app(settings, engine)
    with TestClient(app) as c:
        app.state.scheduler.stop()  # nothing drains the queue now
        body = {"model": MODEL, "messages": user("hi", image_url), "max_tokens": 2}
        app.state.scheduler.queue.put_nowait(object())  # fill the single slot
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        app.state.scheduler.queue.get_nowait()
        app.state.scheduler.start()
        assert c.post("/v1/chat/completions", json=body).status_code == 200


def test_a_serving_app_keeps_what_its_engine_start_made_out_of_the_collectors_sight(engine, image_url):
    """A full garbage collection over a loaded model's objects stops every thread for tenths of a second: the app
    freezes the heap once its engine has started (vLLM's client imports vLLM and loads its tower there), and
    unfreezes it when it stops, so that a process that outlives it collects those objects again."""
    app = create_app(Settings(model=MODEL), engine)
    made_at_start: list[list] = []
    start = app.state.client.start

    async def starting() -> None:
        await start()
        made_at_start.append([])

    app.state.client.start = starting
    frozen_before = gc.get_freeze_count()
    with TestClient(app) as c:
        assert gc.get_freeze_count() > frozen_before
        assert not any(o is made_at_start[0] for o in gc.get_objects())
        body = {"model": MODEL, "messages": user("hi", image_url), "max_tokens": 2}
        assert c.post("/v1/chat/completions", json=body).status_code == 200
    assert gc.get_freeze_count() == 0 and any(o is made_at_start[0] for o in gc.get_objects())


def test_settings_from_yaml_and_env(tmp_path, monkeypatch):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("model: tiny-random/qwen2-vl\nport: 9001\nqueue_size: 3\n")
    monkeypatch.setenv("SEERIGHT_PORT", "9002")
    s = Settings.load(cfg, queue_size=None, max_batch_size=2)
    assert (s.model, s.port, s.queue_size, s.max_batch_size) == ("tiny-random/qwen2-vl", 9002, 3, 2)
    assert json.loads(s.model_dump_json())["allow_remote_urls"] is False
