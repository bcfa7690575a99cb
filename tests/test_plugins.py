"""Adding a method is one file plus its config entry: a method defined in a test module is served over
HTTP (schema, defaults, chat request, preset), run by ``seeright bench`` and by the testbed sweep."""

from __future__ import annotations

import base64
import io
import math

import pytest
import yaml
from conftest import make_image
from fastapi.testclient import TestClient
from toy_method import ImageGain

from seeright.interventions.registry import MethodRegistry
from seeright.service.api.app import create_app
from seeright.service.engine import Engine, EngineGenerator, GenerationRequest
from seeright.service.model_configs import builtin_configs
from seeright.service.settings import Settings
from seeright.testbed import results as shapes_results
from seeright.tools import bench

MODEL = "tiny-random/llava"


@pytest.fixture(scope="module")
def toy_engine(tmp_path_factory) -> Engine:
    """The tiny LLaVA with the toy method registered and a config entry for it (gain 2 on this model)."""
    config = next(c for c in builtin_configs() if c.name == "tiny-random-llava")
    path = tmp_path_factory.mktemp("config") / "tiny-with-toy.yaml"
    path.write_text(yaml.safe_dump({"family": config.family, "methods": {**config.methods, "image_gain": {"gain": 2.0}}}))
    return Engine.from_pretrained(MODEL, model_config=str(path), methods=MethodRegistry.builtin().with_methods(ImageGain()))


def test_registry_orders_and_refuses_duplicates():
    registry = MethodRegistry.builtin().with_methods(ImageGain())
    orders = [registry[n].order for n in registry]
    assert orders == sorted(orders) and "image_gain" in registry
    with pytest.raises(ValueError, match="registered twice"):
        MethodRegistry([ImageGain(), ImageGain()])
    assert "image_gain" not in MethodRegistry.builtin()  # registering returned a new registry; nothing global


def test_toy_method_served_over_http(toy_engine):
    image_url = "data:image/png;base64," + base64.b64encode(_png(make_image(3))).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": "Describe the picture."}]}]
    with TestClient(create_app(Settings(model=MODEL), toy_engine)) as client:
        cards = {c["name"]: c for c in client.get("/v1/interventions").json()["data"]}
        assert cards["image_gain"]["parameters"]["properties"]["gain"]["default"] == 1.5
        assert cards["image_gain"]["defaults"] == {"layers": [3, 4, 5], "gain": 2.0}  # depth rule, then config entry
        assert f"{MODEL}+image_gain" in {m["id"] for m in client.get("/v1/models").json()["data"]}
        answers = {}
        for key, extra in (("plain", {}), ("field", {"interventions": {"image_gain": {"gain": 8.0}}}),
                           ("preset", {"model": f"{MODEL}+image_gain"})):
            body = {"model": MODEL, "messages": messages, "max_tokens": 8, "logprobs": True, **extra}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            answers[key] = [t["logprob"] for t in r.json()["choices"][0]["logprobs"]["content"]]
        assert answers["field"] != answers["plain"] and answers["preset"] != answers["plain"]
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                      "interventions": {"image_gain": {"gain": 99}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "interventions.image_gain.gain"


def test_toy_method_in_bench_and_testbed_sweep(toy_engine, tmp_path):
    result = bench.run_bench(MODEL, new_tokens=3, reps=1, warmup=0, device="cpu", dtype="float32", memory=False,
                             reference=True, batch_reps=1, methods=toy_engine.methods)
    assert math.isfinite(result["decode_ratio"]["image_gain"]) and result["request_ratio"]["image_gain"] > 0
    assert "image_gain" not in result["reference_ratio"]  # no literal version declared: not timed, not invented
    rows = shapes_results.configs(toy_engine.methods)
    toy_rows = tuple(r for r in rows if r[0].startswith("image_gain"))
    assert [label for label, _ in toy_rows] == ["image_gain", "image_gain gain=3"]
    model_sweep = shapes_results.configs(toy_engine.methods, {"image_gain": [{"gain": 5.0}, {"gain": 0.5}]})
    assert [r for r in model_sweep if r[0].startswith("image_gain")] == [
        ("image_gain", {"image_gain": {}}), ("image_gain gain=5", {"image_gain": {"gain": 5.0}}),
        ("image_gain gain=0.5", {"image_gain": {"gain": 0.5}})]  # a model's sweep replaces the method's own
    results = shapes_results.run(EngineGenerator(toy_engine), tmp_path, seed=5, n_images=3, rows=toy_rows, batch_size=8,
                                 log=lambda msg: None)
    assert set(results["methods"]) == {"image_gain", "image_gain gain=3"}
    assert results["methods"]["image_gain"]["pope"]["splits"]["random"]["n"] > 0


def test_toy_method_rows_equal_rows_alone(toy_engine):
    """Per-row decisions: a toy row batched with a plain row and a VAR row gets what it gets alone."""
    reqs = [GenerationRequest(prompt="Describe the picture.", images=[make_image(i)], interventions=iv, max_new_tokens=4,
                              logprobs=True) for i, iv in enumerate(({"image_gain": {"gain": 4.0}}, {}, {"var": {}}))]
    batched = toy_engine.generate_batch(reqs)
    for req, out in zip(reqs, batched):
        alone = toy_engine.generate_batch([req])[0]
        assert out.token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(out.logprobs, alone.logprobs)) < 1e-4


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()
