"""Contrast branches (VCD, RITUAL, PAI's CFG): what composes and what is refused, reported log-probs, the
batch and KV accounting of the branch row, the API's view. Their generations are checked against the
independent references (``test_independent_references.py``) and alone vs joined (``test_continuous.py``)."""

from __future__ import annotations

import asyncio
import math

import pytest
from conftest import FAMILIES, QUESTIONS, make_image
from test_batch_mates import engine_for

from seeright.service.client import EngineClient
from seeright.service.engine import GenerationRequest, RequestError
from seeright.service.scheduler import Scheduler


@pytest.mark.parametrize("given", [{"vcd": {}, "ritual": {}}, {"vcd": {}, "pai": {"cfg": True}}, {"ritual": {}, "pai": {"cfg": True}}])
def test_two_contrast_branches_are_refused_with_the_reason(given):
    engine = engine_for(FAMILIES[0])
    req = GenerationRequest(prompt=QUESTIONS[0], images=[make_image(0)], interventions=given, max_new_tokens=2)
    with pytest.raises(RequestError, match="do not compose") as err:
        engine.validate(req)
    assert err.value.field == "interventions"


@pytest.mark.parametrize("given", [{"vcd": {}, "vhr": {}}, {"ritual": {}, "var": {}}, {"pai": {"cfg": True}, "gift": {}},
                                   {"vcd": {}, "pai": {}}])
def test_attention_edits_compose_with_one_contrast(given):
    engine = engine_for(FAMILIES[1])
    out = engine.generate(QUESTIONS[1], image=make_image(1), interventions=given, max_new_tokens=3)
    assert set(out.diagnostics) >= set(given) and out.token_ids


def test_log_probs_of_ruled_out_tokens_stay_json_numbers():
    engine = engine_for(FAMILIES[0])
    out = engine.generate(QUESTIONS[2], image=make_image(2), interventions={"vcd": {"beta": 0.9}}, max_new_tokens=3,
                          logprobs=True, top_logprobs=20)
    values = [lp for step in out.top_logprobs for _, lp in step]
    assert all(math.isfinite(v) for v in values + out.logprobs)
    assert min(values) == -9999.0  # the cutoff left fewer than 20 plausible tokens: the rest are floored


def test_noise_and_transform_repeat_per_seed_and_differ_across_seeds():
    engine = engine_for(FAMILIES[1])
    for name in ("vcd", "ritual"):
        runs = [engine.generate(QUESTIONS[3], image=make_image(3), interventions={name: {"seed": seed}}, max_new_tokens=4,
                                logprobs=True) for seed in (0, 0, 1, 2)]
        assert runs[0].token_ids == runs[1].token_ids and runs[0].logprobs == runs[1].logprobs
        assert any(r.logprobs != runs[0].logprobs for r in runs[2:]), name


def test_a_request_with_a_branch_runs_even_where_one_row_is_the_batch_limit():
    engine = engine_for(FAMILIES[0])
    scheduler = Scheduler(engine, max_batch_size=1, batch_wait_s=0.0)
    client = EngineClient(scheduler)
    reqs = [GenerationRequest(prompt=QUESTIONS[i], images=[make_image(i)], interventions=plan, max_new_tokens=3)
            for i, plan in enumerate([{"vcd": {}}, {}, {"ritual": {}}])]
    scheduler.start()
    async def main():
        return await asyncio.wait_for(asyncio.gather(*(client.generate(r) for r in reqs)), 120)

    try:
        outs = asyncio.run(main())
    finally:
        scheduler.stop()
    assert [o.token_ids for o in outs] == [engine.generate_batch([r])[0].token_ids for r in reqs]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_contrast_and_plain_rows_gives_each_row_what_it_gets_alone(family):
    engine = engine_for(family)
    plans = [{}, {"vcd": {}}, {"ritual": {"seed": 2}}, {"pai": {"cfg": True}}, {"vhr": {}}, {"vcd": {"seed": 5}, "gift": {}}]
    reqs = [GenerationRequest(prompt=QUESTIONS[i % 4], images=[make_image(i)], interventions=plan, max_new_tokens=5,
                              logprobs=True) for i, plan in enumerate(plans)]
    together = engine.generate_batch(reqs)
    for req, out in zip(reqs, together):
        alone = engine.generate_batch([req])[0]
        assert out.token_ids == alone.token_ids, req.interventions
        assert max(abs(a - b) for a, b in zip(out.logprobs, alone.logprobs)) < 1e-4, req.interventions
