"""ViF: the fast path against its literal loops on the same tensors, the visual flow between two requests (the relay
one response returns, passed back by the next), and refusals naming the field, through the engine and the API. Its
whole generations against an independent reference: tests/test_independent_references.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import QUESTIONS
from fastapi.testclient import TestClient
from test_agser import body
from test_batch_mates import engine_for

from seeright.service.api.app import create_app
from seeright.service.engine import Engine, GenerationRequest, RequestError
from seeright.service.settings import Settings


def ask(engine: Engine, images, given: dict, n: int = 3, max_new_tokens: int = 7):
    return engine.generate_batch([
        GenerationRequest(prompt=q, images=[im], interventions={"vif": given} if given is not None else {},
                          max_new_tokens=max_new_tokens - i, logprobs=True)  # rows end at different steps
        for i, (q, im) in enumerate(zip(QUESTIONS[:n], images[:n]))
    ])


@pytest.mark.parametrize("given", [{}, {"relay_ratio": 0.25, "tau": 1.5, "alpha_mid": 0.7, "alpha_deep": 0.4}])
def test_vif_matches_literal(engine, images, given):
    """Signals summed head by head, the ranking as a sort of (value, index) pairs, and the reallocation written key by
    key give the same relay tokens, tokens and log-probs, in a batch whose rows end at different steps."""
    slow_engine = Engine.from_pretrained(engine.model_id, methods=engine.methods.with_methods(engine.methods.literal("vif")))
    fast, slow, plain = ask(engine, images, given), ask(slow_engine, images, given), ask(engine, images, None)
    for a, b in zip(fast, slow):
        assert a.token_ids == b.token_ids and a.diagnostics["vif"]["relay"] == b.diagnostics["vif"]["relay"]
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert any(a.token_ids != c.token_ids or not np.allclose(a.logprobs, c.logprobs, atol=1e-3) for a, c in zip(fast, plain))


def test_relay_counts_and_flow(llava, images):
    """The relay is max(1, int(N * ratio)) image tokens; passed back, it replaces the scoring pass and gives the same
    answer; another relay gives another answer."""
    request = GenerationRequest(prompt=QUESTIONS[0], images=[images[0]])
    tokens = len(llava.encode(request.chat(), [images[0]]).layout.image_positions)
    for ratio in (0.02, 0.25, 1.0):
        out = ask(llava, images, {"relay_ratio": ratio}, n=1)[0].diagnostics["vif"]
        assert len(out["relay"]) == max(1, int(tokens * ratio)) and out["scored"]
        assert out["relay"] == sorted(set(out["relay"])) and 0 <= out["relay"][0] and out["relay"][-1] < tokens
    first = ask(llava, images, {"relay_ratio": 0.25}, n=1)[0]
    again = ask(llava, images, {"relay_ratio": 0.25, "relay": first.diagnostics["vif"]["relay"]}, n=1)[0]
    assert again.diagnostics["vif"]["scored"] is False and again.token_ids == first.token_ids
    np.testing.assert_allclose(again.logprobs, first.logprobs, atol=1e-6)
    others = [j for j in range(tokens) if j not in first.diagnostics["vif"]["relay"]][: len(first.diagnostics["vif"]["relay"])]
    moved = ask(llava, images, {"relay": others}, n=1)[0]
    assert moved.token_ids != first.token_ids or not np.allclose(moved.logprobs, first.logprobs, atol=1e-3)


@pytest.mark.parametrize("given,message", [
    ({"relay": [10_000]}, "past this request's"), ({"relay": [-1]}, ">= 0"), ({"relay": []}, "at least one"),
    ({"mid_layers": []}, "at least one"),
    ({"deep_layers": [99]}, "out of range"),
])
def test_vif_refusals_name_the_field(llava, images, given, message):
    with pytest.raises(RequestError) as err:
        ask(llava, images, given, n=1)
    assert err.value.field == "interventions.vif" and message in err.value.message


def test_visual_flow_over_the_api():
    """The first agent's choice carries ``signals.vif.relay`` (plain and streamed) without asking for diagnostics;
    the second agent passes it back and gets the same relay; a relay for other images is a 400 naming the field."""
    with TestClient(create_app(Settings(model="tiny-random/llava"), engine_for("tiny-random/llava"))) as client:
        first = client.post("/v1/chat/completions", json=body(interventions={"vif": {}})).json()
        relay = first["choices"][0]["signals"]["vif"]
        assert relay["scored"] is True and len(relay["relay"]) >= 1 and first["choices"][0].get("diagnostics") is None
        events = [json.loads(line[6:]) for line in client.post(
            "/v1/chat/completions", json=body(interventions={"vif": {}}, stream=True)).text.splitlines()
            if line.startswith("data: {")]
        finals = [e for e in events if e["choices"] and e["choices"][0].get("signals")]
        assert len(finals) == 1 and finals[0]["choices"][0]["signals"]["vif"] == relay
        second = client.post("/v1/chat/completions", json=body(interventions={"vif": {"relay": relay["relay"]}})).json()
        assert second["choices"][0]["signals"]["vif"] == {"relay": relay["relay"], "scored": False}
        assert second["choices"][0]["message"] == first["choices"][0]["message"]
        bad = client.post("/v1/chat/completions", json=body(interventions={"vif": {"relay": [100_000]}}))
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "interventions.vif"
        assert client.get("/health").status_code == 200


def test_the_chain_measurement_asks_every_setting_the_same_questions(llava):
    """``python -m seeright.testbed.vif_chain`` on a few scenes: every setting answers the same POPE questions, the
    settings sharing agent 1's description the same seeded ones (so their comparison is paired), and the table renders."""
    from seeright.testbed import vif_chain

    result = vif_chain.run(llava, seed=5, n_images=4, caption_tokens=6, answer_tokens=2)
    settings = result["settings"]
    assert set(settings) == set(vif_chain.SETTINGS)
    assert len({s["pope_questions"] for s in settings.values()}) == 1 and settings["alone"]["pope_questions"] > 0
    assert settings["alone"]["seeded_questions"] == settings["chain"]["seeded_questions"] == settings["chain_vif_receiver"]["seeded_questions"]
    assert "snowballing" in vif_chain.markdown(result)
    assert vif_chain.named_objects("Two red squares and a circle.") == {"square", "circle"}
