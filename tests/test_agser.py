"""AGSER over the API: ``signals.agser`` (plain and streamed, beside Lookback Lens), the same signal as
``interventions.agser``, and refusals naming the field. Its maths: tests/test_independent_references.py and
tests/test_methods.py."""

from __future__ import annotations

import json

from conftest import QUESTIONS
from test_batch_mates import engine_for
from fastapi.testclient import TestClient

from seeright.service.api.app import create_app
from seeright.service.settings import Settings

IMAGE = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


def body(**extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": QUESTIONS[0]}]
    return {"model": "tiny-random/llava", "max_tokens": 5, "messages": [{"role": "user", "content": content}], **extra}


def test_agser_signal_over_the_api_plain_and_streamed():
    engine = engine_for("tiny-random/llava")
    with TestClient(create_app(Settings(model="tiny-random/llava"), engine)) as client:
        plain = client.post("/v1/chat/completions", json=body(signals={"agser": True, "lookback": True})).json()
        signals = plain["choices"][0]["signals"]
        agser = signals["agser"]
        assert set(agser) == {"score", "attentive_query", "non_attentive_query", "attentive_answer", "non_attentive_answer",
                              "attentive_consistency", "non_attentive_consistency"}
        assert agser["score"] == agser["attentive_consistency"] - agser["non_attentive_consistency"]
        assert "lookback" in signals
        words = QUESTIONS[0].split()
        assert sorted(agser["attentive_query"].split() + agser["non_attentive_query"].split()) == sorted(words)
        assert len(agser["attentive_query"].split()) == round(2 / 3 * len(words))
        alone = client.post("/v1/chat/completions", json=body()).json()
        assert plain["choices"][0]["message"] == alone["choices"][0]["message"]  # the answer itself is untouched
        asked = client.post("/v1/chat/completions", json=body(interventions={"agser": {}})).json()
        assert asked["choices"][0]["signals"]["agser"] == agser
        events = [json.loads(line[6:]) for line in client.post("/v1/chat/completions", json=body(signals={"agser": True}, stream=True)).text.splitlines()
                  if line.startswith("data: {")]
        with_signals = [e for e in events if e["choices"] and "signals" in e["choices"][0]]
        assert len(with_signals) == 1 and with_signals[0]["choices"][0]["signals"]["agser"] == agser


def test_agser_refusals_name_the_field():
    engine = engine_for("tiny-random/llava")
    with TestClient(create_app(Settings(model="tiny-random/llava"), engine)) as client:
        both = client.post("/v1/chat/completions", json=body(signals={"agser": True}, interventions={"agser": {}}))
        assert both.status_code == 400 and both.json()["error"]["param"] == "signals.agser"
        text_only = body(interventions={"agser": {"image": "split"}}, messages=[{"role": "user", "content": QUESTIONS[0]}])
        bad = client.post("/v1/chat/completions", json=text_only)
        assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("interventions.agser")
        text_only["messages"][0]["content"] = QUESTIONS[1]
        whole = client.post("/v1/chat/completions", json={**text_only, "interventions": {"agser": {}}})
        assert whole.status_code == 200 and "score" in whole.json()["choices"][0]["signals"]["agser"]  # no image needed
        bad = client.post("/v1/chat/completions", json=body(interventions={"agser": {"attentive_fraction": 1.5}}))
        assert bad.status_code == 400 and "agser" in bad.json()["error"]["param"]
        assert client.post("/v1/chat/completions", json=body()).status_code == 200  # still serving
