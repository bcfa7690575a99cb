"""OpenAI API fidelity through the ``openai`` SDK: ``top_logprobs``, ``n`` choices (seeded per choice),
penalties, and a 400 naming each field this server does not implement (harmless vendor fields pass)."""

from __future__ import annotations

import base64
import io

import openai
import pytest
import torch
from conftest import make_image
from fastapi.testclient import TestClient

from seeright.service.api.app import create_app
from seeright.service.decoding import RowDecoding, apply_penalties
from seeright.service.engine import Engine, GenerationRequest
from seeright.service.settings import Settings

MODEL = "tiny-random/llava"


def _url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


MESSAGES = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(make_image(2))}},
                                         {"type": "text", "text": "Describe the picture."}]}]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(Settings(model=MODEL, batch_wait_ms=50), engine)) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)


def test_top_logprobs_plain_and_streamed(sdk):
    resp = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and abs(values[0] - entry.logprob) < 1e-6  # greedy: the top one
        assert entry.bytes == list(entry.token.encode())
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3,
                                              stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert all(len(e.top_logprobs) == 3 for e in streamed)
    with_text = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(with_text) >= 2 and all(c.logprobs and c.logprobs.content for c in with_text)  # each delta brings its own


def test_n_choices_are_rows_seeded_per_choice(sdk, engine):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=11)
    resp = sdk.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in resp.choices]
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert texts == [sdk.chat.completions.create(**{**kw, "seed": 11 + i}).choices[0].message.content for i in range(3)]
    assert len(set(texts)) > 1  # different seeds, different samples
    assert resp.usage.completion_tokens == sum(
        sdk.chat.completions.create(**{**kw, "seed": 11 + i}).usage.completion_tokens for i in range(3))
    streamed: dict[int, str] = {}
    for chunk in sdk.chat.completions.create(n=3, stream=True, **kw):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


def test_penalties_follow_their_formulas():
    scores = torch.tensor([2.0, -1.0, 0.5, 3.0])
    generated = torch.tensor([0, 0, 2])
    row = RowDecoding(4, presence_penalty=0.5, frequency_penalty=0.25)
    expected = torch.tensor([2.0 - 2 * 0.25 - 0.5, -1.0, 0.5 - 0.25 - 0.5, 3.0])
    torch.testing.assert_close(apply_penalties(scores, generated, generated, row), expected)
    row = RowDecoding(4, repetition_penalty=2.0)
    seen = torch.tensor([1, 3, 3])
    torch.testing.assert_close(apply_penalties(scores, generated, seen, row), torch.tensor([2.0, -2.0, 0.5, 1.5]))


def test_penalized_rows_change_output_and_keep_their_batch_mates(engine):
    def req(**kw):
        return GenerationRequest(prompt="Describe the picture.", images=[make_image(2)], max_new_tokens=12, **kw)

    plain = engine.generate_batch([req()])[0]
    penalized = engine.generate_batch([req(presence_penalty=-2.0, frequency_penalty=-2.0)])[0]
    assert penalized.token_ids != plain.token_ids
    both = engine.generate_batch([req(), req(presence_penalty=-2.0, frequency_penalty=-2.0)])
    assert [o.token_ids for o in both] == [plain.token_ids, penalized.token_ids]


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
    ("response_format", {"type": "json_object"}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("logit_bias", {"5": 10}),
    ("top_logprobs", 25),
    ("n", 99),
])
def test_unsupported_fields_are_refused_by_name(client, field, value):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "logprobs": True,
                                                  field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(field), r.json()


def test_top_logprobs_without_logprobs_is_refused(client):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_harmless_vendor_fields_pass(client):
    extra = {"user": "u1", "metadata": {"run": "a"}, "store": False, "response_format": {"type": "text"},
             "modalities": ["text"], "service_tier": "auto"}
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text
