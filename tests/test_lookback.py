"""Lookback Lens signals: ratios against a stock model's own eager attentions, outputs untouched, and the API's
``signals`` field (plain and streamed)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QUESTIONS, make_image
from fastapi.testclient import TestClient
from test_batch_mates import engine_for

from seeright.model_zoo.tiny_random import TINY_MODELS
from seeright.service.api.app import create_app
from seeright.service.engine import GenerationRequest
from seeright.service.settings import Settings

TOKENS = 6


def stock_ratios(family: str, prompt_ids: torch.Tensor, inputs: dict, generated: list[int], image_token: int) -> list[float]:
    """Mean over layers and heads of mean(A[image]) / (mean(A[image]) + mean(A[generated so far])) for each
    generated token from the second, from a fresh stock copy's eager attentions over the whole sequence."""
    model = TINY_MODELS[family]()[0]
    model.set_attn_implementation("eager")
    ids = torch.cat([prompt_ids, torch.tensor(generated[:-1])])[None]
    full = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = (ids == image_token).to(torch.int32)
    with torch.no_grad():
        attentions = model(**full, output_attentions=True).attentions  # L x [1, H, T, T]
    image = (prompt_ids == image_token).nonzero().flatten()
    start, ratios = len(prompt_ids), []
    for query in range(start, ids.shape[1]):
        per_layer = []
        for layer in attentions:
            row = layer[0, :, query].double()  # [H, T]
            a_img = row[:, image].mean(-1)
            a_new = row[:, start : query + 1].mean(-1)
            per_layer.append(a_img / (a_img + a_new))
        ratios.append(float(torch.stack(per_layer).mean()))
    return ratios


@pytest.mark.parametrize("family", ["tiny-random/llava", "tiny-random/qwen2-vl"])
@pytest.mark.parametrize("companion", [{}, {"vhr": {}}])
def test_ratios_match_stock_eager_attentions_and_leave_the_output_alone(family, companion):
    engine = engine_for(family)
    image = make_image(4)
    request = GenerationRequest(prompt=QUESTIONS[2], images=[image], max_new_tokens=TOKENS, logprobs=True,
                                interventions={**companion, "lookback": {"features": True}})
    out = engine.generate_batch([request])[0]
    plain = engine.generate_batch([GenerationRequest(prompt=QUESTIONS[2], images=[image], max_new_tokens=TOKENS,
                                                     logprobs=True, interventions=companion)])[0]
    assert out.token_ids == plain.token_ids and out.logprobs == plain.logprobs  # reading changes nothing
    signals = out.diagnostics["lookback"]
    assert len(signals["per_token"]) == len(out.token_ids) - 1
    assert len(signals["features"]) == len(out.token_ids) - 1 and len(signals["features"][0]) == engine.info.num_layers
    if not companion:  # the stock model has no VHR: compare where both compute the same attention
        encoded = engine.encode(request.chat(), [image])
        batch = engine.collate([encoded])
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        expected = stock_ratios(family, encoded.input_ids, inputs, out.token_ids, engine.adapter.image_token_id)
        assert signals["per_token"] == pytest.approx(expected, abs=1e-5)
        assert signals["mean_ratio"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert all(0 < r < 1 for r in signals["per_token"])


def test_signals_over_the_api_plain_and_streamed():
    engine = engine_for("tiny-random/llava")
    image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
    body = {"model": "tiny-random/llava", "max_tokens": 5, "signals": {"lookback": True}, "messages": [{"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": QUESTIONS[0]}]}]}
    with TestClient(create_app(Settings(model="tiny-random/llava"), engine)) as client:
        plain = client.post("/v1/chat/completions", json=body).json()
        lookback = plain["choices"][0]["signals"]["lookback"]
        assert len(lookback["per_token"]) == plain["usage"]["completion_tokens"] - 1 and "features" not in lookback
        events = [json.loads(line[6:]) for line in client.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
                  if line.startswith("data: {")]
        with_signals = [e for e in events if e["choices"] and "signals" in e["choices"][0]]
        assert len(with_signals) == 1 and with_signals[0]["choices"][0]["finish_reason"]
        assert with_signals[0]["choices"][0]["signals"] == plain["choices"][0]["signals"]
        assert client.post("/v1/chat/completions", json={**body, "signals": None}).json()["choices"][0].get("signals") is None
        bad = client.post("/v1/chat/completions", json={**body, "signals": {"lookback": True, "attention_maps": True}})
        assert bad.status_code == 400 and "signals" in bad.json()["error"]["param"]
        text_only = {**body, "messages": [{"role": "user", "content": QUESTIONS[0]}]}
        bad = client.post("/v1/chat/completions", json=text_only)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "signals.lookback"
