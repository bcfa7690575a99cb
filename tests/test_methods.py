"""Each method against a slow literal implementation of its formulas, on the same tensors, at prefill and
decode; each branch fires; each method changes the output distribution."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import QUESTIONS
from fastapi.testclient import TestClient

from seeright.interventions.adapters import ChatTurn
from seeright.interventions.literal import loops as ref
from seeright.interventions.literal.vemask import LiteralVEMask
from seeright.interventions.memo import Memo
from seeright.interventions.methods.base import RequestInputs
from seeright.interventions.registry import MethodRegistry
from seeright.model_zoo.tiny_random import TINY_MODELS
from seeright.service.api.app import create_app
from seeright.service.engine import Engine, GenerationRequest, RequestError
from seeright.service.settings import Settings


def spy(monkeypatch, method, attr):
    """Record (args, result) of every call of ``method.attr``."""
    calls = []
    original = getattr(method, attr)

    def wrapper(*args):
        result = original(*args)
        calls.append((args, result))
        return result

    monkeypatch.setattr(method, attr, wrapper)
    return calls


def run(engine, images, interventions, n=2, max_new_tokens=6, **kw):
    reqs = [
        GenerationRequest(prompt=q, images=[im], interventions=interventions, max_new_tokens=max_new_tokens, **kw)
        for q, im in zip(QUESTIONS[:n], images[:n])
    ]
    return engine.generate_batch(reqs)


# ---- PAI ---------------------------------------------------------------------------------------------
def test_pai_matches_literal(engine, images, monkeypatch):
    calls = spy(monkeypatch, engine.methods["pai"], "edit_scores")
    run(engine, images, {"pai": {"alpha": 0.5}}, n=3)
    steps, layers = set(), set()
    for (layer, scores, states, step, q0), result in calls:
        steps.add(step)
        layers.add(layer)
        for row, state in enumerate(states):
            image = state.layout.image_positions.tolist()
            expected = ref.pai_boost(scores[row], image, state.params.alpha)
            torch.testing.assert_close(result[row].double(), expected, atol=1e-6, rtol=1e-5)
            moved = (result[row] != scores[row]).nonzero()
            assert moved.numel() and set(moved[:, 1].tolist()) == {scores.shape[2] - 1}  # the last query row only
            assert set(moved[:, 2].tolist()) <= set(image)
    assert steps >= {0, 1}
    assert layers == set(range(2, engine.info.num_layers))  # release: [2, L)


# ---- Lookback Lens ---------------------------------------------------------------------------------------
def test_lookback_matches_literal(engine, images, monkeypatch):
    calls = spy(monkeypatch, engine.methods["lookback"], "edit_probs")
    outs = run(engine, images, {"lookback": {"layers": [1, 3]}}, n=2)
    expected: dict[int, list[list[float]]] = {}
    for (layer, probs, states, step, q0), _ in calls:
        for r, state in enumerate(states):
            ratios = ref.lookback_ratios(probs[r, :, -1], state.layout.image_positions.tolist(), state.layout.length)
            expected.setdefault(id(state), []).append(ratios)
    per_row = list(expected.values())
    for out, rows in zip(outs, per_row):
        means = [float(np.mean(rows[i] + rows[i + 1])) for i in range(0, len(rows), 2)]  # two layers per token
        assert out.diagnostics["lookback"]["per_token"] == pytest.approx(means, abs=1e-6)


# ---- AGSER -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", [{}, {"attention_from": "answer", "image": "split", "unit": "token"}])
def test_agser_matches_literal(engine, images, given):
    """Contributions summed head by head and position by position give the same sub-queries, answers and scores, in
    a batch whose rows end at different steps; the answers themselves are the plain ones."""
    literal = engine.methods.with_methods(engine.methods.literal("agser"))
    slow_engine = Engine.from_pretrained(engine.model_id, methods=literal)
    fast = run(engine, images, {"agser": given}, n=3, max_new_tokens=7)
    slow = run(slow_engine, images, {"agser": given}, n=3, max_new_tokens=7)
    plain = run(engine, images, {}, n=3, max_new_tokens=7)
    for a, b, c in zip(fast, slow, plain):
        assert a.token_ids == b.token_ids == c.token_ids
        x, y = a.diagnostics["agser"], b.diagnostics["agser"]
        assert {k: v for k, v in x.items() if k != "score"} == {k: v for k, v in y.items() if k != "score"}
        assert x["score"] == pytest.approx(y["score"], abs=1e-12)


def test_agser_score_is_the_papers_estimator(llava, images):
    """``lam * r_att - r_non`` from the two ROUGE-L consistencies, and an answer repeated word for word scores 1."""
    out = run(llava, images, {"agser": {"lam": 0.5}}, n=1, max_new_tokens=5)[0].diagnostics["agser"]
    assert out["score"] == pytest.approx(0.5 * out["attentive_consistency"] - out["non_attentive_consistency"])
    from seeright.interventions.methods.agser import rouge_l, split
    assert rouge_l("A red circle.", "a red circle") == 1.0 and rouge_l("", "a red circle") == 0.0
    assert rouge_l("red blue", "blue red green") == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert split(torch.tensor([0.1, 0.5, 0.5, 0.2]), 2 / 3) == ([1, 2, 3], [0])  # 3 of 4, ties to the earlier


# ---- Lookback Lens guided decoding ---------------------------------------------------------------------
@pytest.mark.parametrize("given", [{}, {"candidates": 4, "chunk_tokens": 3, "detector_convention": "factual"}])
def test_lookback_decoding_matches_literal(engine, images, given):
    """The ratio rows and the choice written as loops give the same chunks, the same picks and the same answers
    (the literal engine is a model of its own: an engine claims its model's attention modules)."""
    literal = engine.methods.with_methods(engine.methods.literal("lookback_decoding"))
    slow_engine = Engine.from_pretrained(engine.model_id, methods=literal)
    fast = run(engine, images, {"lookback_decoding": given}, n=2, max_new_tokens=7, logprobs=True)
    slow = run(slow_engine, images, {"lookback_decoding": given}, n=2, max_new_tokens=7, logprobs=True)
    for a, b in zip(fast, slow):
        assert a.token_ids == b.token_ids
        chunks_a, chunks_b = a.diagnostics["lookback_decoding"]["chunks"], b.diagnostics["lookback_decoding"]["chunks"]
        assert [c["kept"] for c in chunks_a] == [c["kept"] for c in chunks_b]
        for x, y in zip(chunks_a, chunks_b):
            assert x.get("hallucination_probability") == pytest.approx(y.get("hallucination_probability"), abs=1e-5)
    assert any(c["kept"] for out in fast for c in out.diagnostics["lookback_decoding"]["chunks"])  # not always the first


def test_lookback_decoding_streams_only_kept_chunks(llava, images):
    """What a client streams is the answer: the kept chunks' tokens, each once, in order."""
    streamed: dict[int, list[int]] = {0: [], 1: []}
    outs = llava.generate_batch(
        [GenerationRequest(prompt=q, images=[im], interventions={"lookback_decoding": {}}, max_new_tokens=6)
         for q, im in zip(QUESTIONS[:2], images[:2])],
        on_token=lambda row, token: streamed[row].append(token),
    )
    assert [streamed[0], streamed[1]] == [outs[0].token_ids, outs[1].token_ids]


# ---- VE masking ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", [
    {"pgd_steps": 3}, {"mask_ratio": 0.3, "pgd_steps": 3}, {"threshold": 0.8, "random_start": False, "pgd_steps": 4},
    {"include_cls": False, "mask_target": "keys", "pgd_steps": 2},
])
def test_vemask_matches_literal(llava, images, monkeypatch, given):
    method = llava.methods["vemask"]
    attacks, selections = spy(monkeypatch, method, "attack"), spy(monkeypatch, method, "select")
    llava.passes.cache.clear()  # an earlier case's attack on these images would be reused
    outs = run(llava, images, {"vemask": given}, n=2)
    literal = LiteralVEMask()
    per_request = [(params, result) for (_, _, params), result in attacks]
    # one attack per request: a batched PGD would let batch-mates' kernel rounding flip its sign steps
    assert len(attacks) == len(per_request) == len(selections) == len(outs) == 2
    for (p, (clean, attacked)), ((uncertainty, _), masked), out in zip(per_request, selections, outs):
        assert max(float((attacked[l] - clean[l]).abs().max()) for l in p.deviation_layers) > 0  # the attack moved them
        expected = literal.uncertainty(clean, attacked, p)
        torch.testing.assert_close(uncertainty.double(), expected, atol=1e-12, rtol=1e-5)
        assert torch.equal(masked, literal.select(expected, p)) and masked.any()
        assert out.diagnostics["vemask"]["masked_tokens"] == [m.nonzero().flatten().tolist() for m in masked]


def test_vemask_attacks_an_image_once_and_reuses_it_exactly(llava, images, monkeypatch):
    """A second question about the same image reuses the first's uncertainty map (the release attacks each image
    once, offline): no second attack, and the answer is the one a fresh attack gives. Parameters of the attack make
    a new map; the threshold and the masking reuse it."""
    attacks = spy(monkeypatch, llava.methods["vemask"], "attack")
    ask = lambda question, params: llava.generate_batch([GenerationRequest(
        prompt=question, images=[images[0]], interventions={"vemask": {"pgd_steps": 3, **params}}, max_new_tokens=6)])[0]
    llava.passes.cache.clear()
    first, second = ask(QUESTIONS[0], {}), ask(QUESTIONS[1], {})
    assert len(attacks) == 1
    llava.passes.cache.clear()
    assert ask(QUESTIONS[1], {}).token_ids == second.token_ids and len(attacks) == 2
    ask(QUESTIONS[0], {"threshold": 0.5, "mask_target": "keys"})
    assert len(attacks) == 2
    ask(QUESTIONS[0], {"seed": 1})
    ask(QUESTIONS[0], {"pgd_steps": 4})
    assert len(attacks) == 4
    assert first.diagnostics["vemask"] == ask(QUESTIONS[0], {}).diagnostics["vemask"] and len(attacks) == 4


def test_memo_is_bounded_and_evicts_the_least_recently_used():
    memo, computed = Memo(capacity=2), []
    get = lambda key: memo.get(key, lambda: computed.append(key) or key.upper())
    assert [get("a"), get("b"), get("a"), get("c")] == ["A", "B", "A", "C"]  # "b" is now the oldest: out
    assert computed == ["a", "b", "c"] and len(memo) == 2
    get("b"), get("c")  # "b" computed again, pushing out "a"; "c" still there
    assert computed == ["a", "b", "c", "b"]
    get("a")
    assert computed == ["a", "b", "c", "b", "a"]
    off = Memo(capacity=0)
    off.get("x", lambda: 1), off.get("x", lambda: 1)
    assert (off.misses, len(off)) == (2, 0)


def test_memo_computes_a_key_once_while_callers_wait_for_it():
    """Threads asking for a key being computed wait for that result; a failed computation is stored for nobody."""
    memo, started, release, calls = Memo(), threading.Event(), threading.Event(), []

    def slow() -> str:
        calls.append(1)
        started.set()
        release.wait(5)
        return "map"

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(memo.get, "image", slow)
        started.wait(5)
        others = [pool.submit(memo.get, "image", slow) for _ in range(3)]
        release.set()
        assert [f.result() for f in (first, *others)] == ["map"] * 4
    assert len(calls) == 1 and (memo.misses, memo.hits) == (1, 0)

    def fail() -> str:
        raise RuntimeError("attack failed")

    with pytest.raises(RuntimeError):
        memo.get("other", fail)
    assert memo.get("other", lambda: "again") == "again" and len(memo) == 2


@pytest.mark.parametrize("target", ["outputs", "keys"])
def test_vision_masks_act_in_their_layer_and_image_only(llava, images, target):
    """The adapter's hooks mask a token in the layers and images ``keep`` says, nothing else."""
    adapter = llava.adapter
    pixels = torch.cat([llava.encode([ChatTurn("user", "hi", 1)], [im]).images["pixel_values"] for im in images[:2]])
    tower = adapter.model.model.vision_tower
    with torch.no_grad():
        stock = tower(pixels, output_hidden_states=True).hidden_states
        keep = torch.ones((2, len(stock) - 1, stock[0].shape[1]), dtype=torch.bool)
        keep[1, 1, 3] = False  # image 1, layer 1, token 3
        handles = adapter.mask_vision_attention(keep, target)
        try:
            masked = tower(pixels, output_hidden_states=True).hidden_states
        finally:
            for handle in handles:
                handle.remove()
    assert len(handles) == 1
    torch.testing.assert_close(masked[1], stock[1], rtol=0, atol=0)  # layer 0 untouched
    torch.testing.assert_close(masked[2][0], stock[2][0], rtol=0, atol=0)  # image 0 untouched
    moved = (masked[2][1] - stock[2][1]).abs().amax(-1)
    if target == "outputs":  # only token 3's own row changes in that layer: the others still read it as a key
        assert moved[3] > 1e-4 and float(moved[torch.arange(moved.shape[0]) != 3].max()) == 0
    else:  # every query stops reading token 3
        assert float(moved[torch.arange(moved.shape[0]) != 3].min()) > 0


def test_vemask_is_refused_by_name_where_the_tower_cannot_be_masked(engine):
    if engine.info.vision_layers:
        assert engine.unavailable("vemask") is None
        return
    with pytest.raises(RequestError, match=r"interventions.vemask: .*Qwen2-VL"):
        engine.resolve_params({"vemask": {}})
    assert "vemask" not in engine.runnable()


# ---- PAINT -------------------------------------------------------------------------------------------
def test_paint_matches_literal(llava, images, monkeypatch):
    paint = llava.methods["paint"]
    prepared = spy(monkeypatch, paint, "prepare")
    calls = spy(monkeypatch, paint, "edit_scores")
    run(llava, images, {"paint": {"alpha": 0.6, "beta": 0.4, "local_token_ratio": 0.5, "summary_iqr": 0.5}}, n=3)
    kinds = set()
    for (states, passes), _ in prepared:
        for state in states:
            first, feature = llava.adapter.cls_attention(state.request.prompt.images)
            local, summary = ref.paint_select(first[0].tolist(), feature[0].tolist(), 0.5, 0.5)
            assert state.data["local"][0].nonzero().flatten().tolist() == local
            assert state.data["summary"][0].nonzero().flatten().tolist() == summary
            kinds |= {"local"} if local else set()
            kinds |= {"summary"} if summary else set()
    assert kinds == {"local", "summary"}  # both kinds of tokens are boosted on these images
    steps = set()
    for (layer, scores, states, step, q0), result in calls:
        steps.add(step)
        for row, state in enumerate(states):
            start = state.layout.image_spans[0][0]
            local = [start + j for j in state.data["local"][0].nonzero().flatten().tolist()]
            summary = [start + j for j in state.data["summary"][0].nonzero().flatten().tolist()]
            expected = ref.paint_boost(scores[row], local, summary, 0.6, 0.4)
            torch.testing.assert_close(result[row].double(), expected, atol=1e-6, rtol=1e-5)
    assert steps >= {0, 1}


def test_paint_cls_attention_equals_the_towers_own_eager_attentions(llava, images):
    tower = TINY_MODELS["tiny-random/llava"]()[0].model.vision_tower  # a fresh stock copy: it goes eager here
    tower.set_attn_implementation("eager")
    pixels = llava.encode([GenerationRequest(prompt="x", images=[images[0]]).chat()[0]], [images[0]]).images
    with torch.no_grad():
        attentions = tower(pixels["pixel_values"], output_attentions=True).attentions
    first, feature = llava.adapter.cls_attention(pixels)
    torch.testing.assert_close(first, attentions[0][:, :, 0, 1:].sum(1), atol=1e-5, rtol=1e-5)
    layer = llava.model.config.vision_feature_layer % len(attentions)
    torch.testing.assert_close(feature, attentions[layer][:, :, 0, 1:].sum(1), atol=1e-5, rtol=1e-5)


def test_paint_is_refused_by_name_where_the_tower_has_no_cls_token(engine):
    with TestClient(create_app(Settings(model=engine.model_id), engine)) as client:
        presets = [m["id"] for m in client.get("/v1/models").json()["data"]]
        cards = {c["name"]: c for c in client.get("/v1/interventions").json()["data"]}
    if engine.info.vision_cls_token:
        assert engine.unavailable("paint") is None and f"{engine.model_id}+paint" in presets
        return
    with pytest.raises(RequestError, match=r"interventions.paint: .*\[CLS\]"):
        engine.resolve_params({"paint": {}})
    assert "[CLS]" in cards["paint"]["unavailable"] and f"{engine.model_id}+paint" not in presets
    assert "paint" not in engine.runnable() and "pai" in engine.runnable()  # what bench and loads run here
    assert cards["pai"]["unavailable"] is None and f"{engine.model_id}+pai" in presets


@pytest.mark.parametrize("name,given,formula", [
    ("vcd", {"alpha": 0.7, "beta": 0.2}, lambda sc, br, p: ref.vcd_contrast(sc, br, p.alpha, p.beta)),
    ("ritual", {"alpha": 2.0}, lambda sc, br, p: ref.ritual_contrast(sc, br, p.alpha, p.beta)),
    ("pai", {"cfg": True, "gamma": 1.5}, lambda sc, br, p: ref.cfg_contrast(sc, br, p.gamma, p.cfg_cutoff)),
])
def test_contrast_matches_literal(engine, images, monkeypatch, name, given, formula):
    calls = spy(monkeypatch, engine.methods[name], "contrast")
    run(engine, images, {name: given}, n=2, max_new_tokens=4)
    assert len(calls) >= 4  # every step of every request
    cut = 0
    for (scores, branch, state), result in calls:
        expected = formula(scores, branch, state.params)
        assert torch.equal(torch.isinf(result), torch.isinf(expected))
        finite = ~torch.isinf(expected)
        torch.testing.assert_close(result[finite].double(), expected[finite], atol=1e-5, rtol=1e-5)
        cut += int(torch.isinf(expected).sum())
        assert not torch.equal(branch, scores)  # the branch saw another input
    assert cut > 0  # the plausibility cutoff fired


# ---- VAR ---------------------------------------------------------------------------------------------
def test_var_matches_literal(engine, images, monkeypatch):
    var = engine.methods["var"]
    hidden_calls = spy(monkeypatch, var, "observe_hidden")
    prob_calls = spy(monkeypatch, var, "edit_probs")
    outs = run(engine, images, {"var": {}})
    assert hidden_calls and prob_calls
    visual_sinks = 0
    for (layer, hidden, states, step), _ in hidden_calls:
        for row, state in enumerate(states):
            p = state.params
            expected = ref.var_sinks(hidden[row], p.sink_dims, p.tau, state.layout.pad)
            assert (state.data["sinks"][layer].nonzero().flatten() + state.layout.pad).tolist() == expected
            visual_sinks += len(set(expected) & set(state.layout.image_positions.tolist()))
    assert visual_sinks > 0  # sinks were planted and found
    steps, changed_rows, kept_rows = set(), 0, 0
    for (layer, probs, states, step, q0), result in prob_calls:
        steps.add(step)
        for row, state in enumerate(states):
            p = state.params
            sinks = (state.data["sinks"][layer].nonzero().flatten() + state.layout.pad).tolist()
            vis = state.layout.image_positions.tolist()
            first = state.layout.image_end - q0 if step == 0 else 0
            expected = ref.var_edit(probs[row], sinks, vis, p.rho, p.p, p.min_image_attention, max(first, 0))
            torch.testing.assert_close(result[row].double(), expected, atol=1e-6, rtol=1e-5)
            moved = (result[row] - probs[row]).abs().amax(-1) > 1e-7  # [H, q]
            changed_rows += int(moved.sum())
            kept_rows += int((~moved).sum())
    assert steps >= {0, 1}  # prefill and decode were both checked
    assert changed_rows > 0 and kept_rows > 0  # both branches of the head selection fired
    assert all(sum(sum(v) for v in o.diagnostics["var"]["selected"].values()) > 0 for o in outs)
    assert all(len(v) == 2 for o in outs for v in o.diagnostics["var"]["selected"].values())  # prefill, decode


@pytest.mark.parametrize(("min_image", "visual_sink", "selected"), [
    (0.25, True, True),  # the head's image attention is exactly the minimum: selected (>=, as released)
    (0.2500001, True, False),  # just above it: not
    (0.0, True, True),
    (0.25, False, False),  # no visual sink in the layer: nothing is selected
])
def test_var_selection_at_its_bounds(min_image, visual_sink, selected):
    """Exact binary fractions put a head on step B's bounds; the edit selects as the literal loops do."""
    from seeright.interventions.layout import TokenLayout
    from seeright.interventions.methods.base import RowState
    from seeright.interventions.methods.var import VAR
    from seeright.interventions.runtime import StateBatch
    from seeright.interventions.spec import VARParams

    var = VAR()
    layout = TokenLayout(length=4, pad=0, image_spans=((0, 2),), image_grids=((1, 2),), query_span=(2, 4))
    state = RowState(hooks=var, params=VARParams(sink_dims=[0], min_image_attention=min_image), layout=layout)
    sinks = [0] if visual_sink else [2]
    state.data["sinks"] = {3: torch.tensor([i in sinks for i in range(4)])}
    probs = torch.tensor([0.125, 0.125, 0.5, 0.25, 0.0])[None, None, None]  # [1, 1, 1, 5]: a decode step's row
    result = var.edit_probs(3, probs, StateBatch([state]), 1, 0)
    expected = ref.var_edit(probs[0], sinks, [0, 1], 0.5, 0.4, min_image, 0)
    torch.testing.assert_close(result[0].double(), expected, atol=1e-7, rtol=0)
    assert (not torch.equal(result, probs)) == selected


def test_var_edits_only_text_rows_after_image_at_prefill(llava, images, monkeypatch):
    calls = spy(monkeypatch, llava.methods["var"], "edit_probs")
    run(llava, images, {"var": {}}, n=1, max_new_tokens=1)
    (layer, probs, states, step, q0), result = calls[0]
    assert step == 0 and q0 == states[0].layout.image_end
    torch.testing.assert_close(result.sum(-1), torch.ones_like(result.sum(-1)))  # rows still sum to 1


def test_var_text_sink_found(llava, images):
    out = run(llava, images, {"var": {}}, n=1)[0]
    assert sum(out.diagnostics["var"]["text_sinks"].values()) > 0  # BOS carries a planted text sink


# ---- VHR ---------------------------------------------------------------------------------------------
def test_vhr_matches_literal(engine, images, monkeypatch):
    vhr = engine.methods["vhr"]
    calls = spy(monkeypatch, vhr, "edit_heads")
    run(engine, images, {"vhr": {}}, n=3)
    steps = set()
    for (layer, heads, states, step), result in calls:
        steps.add(step)
        for row, state in enumerate(states):
            p = state.params
            if step == 0:
                chosen, filtered = ref.vhr_select(heads[row, -1], state.data["text_heads"][layer], p.outlier_filter)
                assert state.data["heads"][layer].tolist() == chosen
                assert state.diagnostics["filtered"][layer].tolist() == filtered
                assert 1 <= sum(chosen) < len(chosen)
            chosen = state.data["heads"][layer].tolist()
            expected = ref.vhr_scale(heads[row], chosen, p.alpha, p.prefill_positions == "last" and step == 0)
            torch.testing.assert_close(result[row].double(), expected, atol=1e-6, rtol=1e-5)
    assert steps >= {0, 1}


def test_vhr_text_branch_is_the_image_free_prompt(llava, stock_models, images):
    """The text-only head outputs equal a stock forward of the prompt with the image removed."""
    state = llava.bind({"vhr": {}}, RequestInputs(turns=GenerationRequest(prompt=QUESTIONS[0], images=[images[0]]).chat(), images=[images[0]]))[0]
    llava.methods["vhr"].prepare([state], llava.passes)
    stock = stock_models["tiny-random/llava"]
    captured = {}
    hooks = [
        stock.model.language_model.layers[l].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, l=l: captured.__setitem__(l, a[0][0, -1].clone())
        )
        for l in state.params.layers
    ]
    text_only = llava.encode([t.without_images() for t in state.request.turns], [])
    assert (text_only.input_ids == llava.adapter.image_token_id).sum() == 0
    with torch.no_grad():
        stock(input_ids=text_only.input_ids[None])
    for h in hooks:
        h.remove()
    for l in state.params.layers:
        torch.testing.assert_close(state.data["text_heads"][l], captured[l].view(llava.info.num_heads, -1), atol=1e-5, rtol=1e-5)


def test_vhr_outlier_filter_and_selection_fire(llava, images):
    outs = run(llava, images, {"vhr": {}}, n=4)
    filtered = sum(sum(v) for o in outs for v in o.diagnostics["vhr"]["filtered"].values())
    selected = [sum(v) for o in outs for v in o.diagnostics["vhr"]["heads"].values()]
    assert filtered > 0
    assert all(0 < s < llava.info.num_heads for s in selected)


@pytest.mark.parametrize("positions", ["all", "last"])
def test_vhr_fixed_heads_equal_the_selection_they_copy(llava, images, positions):
    """Heads chosen per request, passed back as fixed ``heads``, give the same tokens and log-probs (the
    scaling alone, with no text-only pass), in a batch that mixes selected and fixed rows."""
    selected = run(llava, images, {"vhr": {"prefill_positions": positions}}, n=2, logprobs=True)
    fixed = [
        {"vhr": {"prefill_positions": positions,
                 "heads": {str(l): torch.as_tensor(m).nonzero().flatten().tolist() for l, m in o.diagnostics["vhr"]["heads"].items()}}}
        for o in selected
    ]
    mixed = llava.generate_batch([
        GenerationRequest(prompt=QUESTIONS[0], images=[images[0]], interventions=fixed[0], max_new_tokens=6, logprobs=True),
        GenerationRequest(prompt=QUESTIONS[1], images=[images[1]], interventions={"vhr": {"prefill_positions": positions}},
                          max_new_tokens=6, logprobs=True),
    ])
    plain = run(llava, images, {}, n=2, logprobs=True)
    for out, ref_out in zip(mixed, selected):
        assert out.token_ids == ref_out.token_ids
        np.testing.assert_allclose(out.logprobs, ref_out.logprobs, atol=1e-5)
    assert any(np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() > 1e-3 for a, b in zip(selected, plain))


def test_vhr_fixed_heads_need_no_image_and_name_bad_fields(llava):
    out = llava.generate_batch([GenerationRequest(prompt=QUESTIONS[0], interventions={"vhr": {"heads": {"1": [0, 2]}}}, max_new_tokens=4)])[0]
    assert out.diagnostics["vhr"]["heads"][1] == [True, False, True] + [False] * (llava.info.num_heads - 3)
    for heads, message in (({"99": [0]}, "vhr.heads: layer indices [99]"), ({"1": [99]}, "vhr.heads: head indices [99]")):
        with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
            llava.validate(GenerationRequest(prompt=QUESTIONS[0], interventions={"vhr": {"heads": heads}}))


# ---- GIFT --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("saliency_pass", ["separate", "auto"])
def test_gift_saliency_matches_literal(engine, stock_models, images, saliency_pass):
    stock = stock_models[engine.model_id]
    req = GenerationRequest(prompt=QUESTIONS[0], images=[images[0]], interventions={"gift": {"saliency_pass": saliency_pass}},
                            max_new_tokens=2)
    inputs = RequestInputs(turns=req.chat(), images=req.images)
    inputs.prompt = engine.encode(inputs.turns, inputs.images)
    state = engine.bind(req.interventions, inputs)[0]
    engine.methods["gift"].prepare([state], engine.passes)
    fusable = state.params.saliency_layers[-1] < state.params.enhance_layers[0]
    assert state.data["fused"] == (saliency_pass == "auto" and fusable)
    if state.data["fused"]:  # the map is made inside the generation's prefill
        assert "saliency" not in state.data
        saliency = torch.tensor(engine.generate_batch([req])[0].diagnostics["gift"]["saliency"], dtype=torch.double)
    else:
        saliency = state.data["saliency"].double()
    layout = inputs.prompt.layout
    assert layout.content_positions  # the rule found content words
    stock.set_attn_implementation("eager")
    try:
        batch = engine.collate([inputs.prompt])
        with torch.no_grad():
            out = stock(**batch, output_attentions=True)
    finally:
        stock.set_attn_implementation("sdpa")
    p = state.params
    expected = ref.gift_saliency(
        [out.attentions[l][0] for l in p.saliency_layers], layout.query_span, list(layout.content_positions),
        layout.image_positions.tolist(), p.alpha, p.head_fraction, p.clip_sigma,
    )
    torch.testing.assert_close(saliency, torch.tensor(expected, dtype=torch.double), rtol=1e-4, atol=1e-4)
    assert saliency.max() > 1.5  # the map is not flat


def test_gift_fused_and_separate_saliency_give_the_same_answer(llava, images):
    outs = {
        mode: run(llava, images, {"gift": {"saliency_pass": mode}}, n=3, max_new_tokens=8, logprobs=True)
        for mode in ("auto", "separate")
    }
    for a, b in zip(outs["auto"], outs["separate"]):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_gift_is_not_fused_beside_another_editing_method(llava, images):
    req = GenerationRequest(prompt=QUESTIONS[0], images=[images[0]], interventions={"gift": {}, "vhr": {}})
    inputs = RequestInputs(turns=req.chat(), images=req.images)
    inputs.prompt = llava.encode(inputs.turns, inputs.images)
    gift_state = next(s for s in llava.bind(req.interventions, inputs) if s.hooks is llava.methods["gift"])
    llava.methods["gift"].prepare([gift_state], llava.passes)
    assert gift_state.data["fused"] is False and "saliency" in gift_state.data


def test_gift_enhancement_matches_literal(engine, images, monkeypatch):
    calls = spy(monkeypatch, engine.methods["gift"], "edit_probs")
    run(engine, images, {"gift": {}}, n=2)
    steps = set()
    captured = 0
    for (layer, probs, states, step, q0), result in calls:
        if layer not in states[0].params.enhance_layers:  # the fused saliency pass only reads here
            captured += 1
            torch.testing.assert_close(result, probs)
            continue
        steps.add(step)
        for row, state in enumerate(states):
            p = state.params
            sal = state.data["saliency"].tolist()
            expected = ref.gift_edit_row(
                probs[row, :, -1], state.layout.image_positions.tolist(), list(range(*state.layout.query_span)),
                sal, p.head_fraction,
            )
            torch.testing.assert_close(result[row, :, -1].double(), expected, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(result[row, :, :-1], probs[row, :, :-1])  # only the last row changes
    assert steps >= {0, 1}
    assert captured == (1 if engine.model_id == "tiny-random/llava" else 0)  # fused on LLaVA's layer layout


def test_gift_without_content_words_uses_all_query_rows(llava, images):
    out = llava.generate("is it the one?", image=images[0], interventions={"gift": {}}, max_new_tokens=2)
    assert all(np.isfinite(out.diagnostics["gift"]["saliency"]))
    every_row = llava.generate("is it the one?", image=images[0], interventions={"gift": {"content_words": "all"}},
                               max_new_tokens=2)
    assert out.diagnostics["gift"]["saliency"] == every_row.diagnostics["gift"]["saliency"]  # the same rows, the same map
    with_content = llava.generate("is the red dog on it?", image=images[0], interventions={"gift": {}}, max_new_tokens=2)
    with_content_all = llava.generate("is the red dog on it?", image=images[0],
                                      interventions={"gift": {"content_words": "all"}}, max_new_tokens=2)
    assert with_content.diagnostics["gift"]["saliency"] != with_content_all.diagnostics["gift"]["saliency"]


# ---- CARVE -------------------------------------------------------------------------------------------
def test_carve_cached_collection_equals_uncached_release_loop(llava, stock_models, images):
    req = GenerationRequest(prompt=QUESTIONS[0], images=[images[1]])
    state = llava.bind({"carve": {}}, RequestInputs(turns=req.chat(), images=list(req.images)))[0]
    original_image = images[1]
    llava.methods["carve"].rewrite([state], llava.passes)
    p = state.params
    stock = stock_models["tiny-random/llava"]
    stock.set_attn_implementation("eager")
    try:
        maps = {}
        for key, text in (("task", QUESTIONS[0]), ("general", p.general_instruction)):
            prompt = llava.encode([type(state.request.turns[-1])("user", text + p.collect_suffix, 1)], [original_image])
            batch = llava.collate([prompt])
            with torch.no_grad():
                maps[key] = ref.carve_collect_uncached(
                    stock, batch, prompt.layout.image_positions.tolist(), p.layers, p.collect_tokens,
                    set(llava.eos_token_ids()),
                )
    finally:
        stock.set_attn_implementation("sdpa")
    for key in ("task", "general"):
        ours = state.data["maps"][key]
        assert len(ours) == len(maps[key])
        for a, b in zip(ours, maps[key]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    grid = llava.adapter.grid
    ours = state.data["maps"]
    fused = ref.carve_fuse(ours["task"], ours["general"], grid, original_image.size, p.lam, p.steps == "all")
    np.testing.assert_allclose(state.data["fused"], fused, rtol=1e-6)
    from_uncached = ref.carve_fuse(maps["task"], maps["general"], grid, original_image.size, p.lam, p.steps == "all")
    np.testing.assert_allclose(state.data["fused"], from_uncached, rtol=1e-4)
    mask = ref.carve_mask(fused, p.top_p, p.min_regions, p.region_fraction)
    np.testing.assert_array_equal(state.data["mask"], mask)
    assert 0 < mask.mean() < 1
    refined = state.request.images[1]
    assert refined.size[0] >= original_image.size[0] or refined.size[1] >= original_image.size[1]
    assert state.request.images[0] is original_image and state.request.turns[-1].num_images == 2


@pytest.mark.parametrize("requery,count", [("original_and_refined", 2), ("refined", 1)])
def test_carve_requery_choice(llava, images, requery, count):
    req = GenerationRequest(prompt=QUESTIONS[0], images=[images[0]])
    state = llava.bind({"carve": {"requery": requery}}, RequestInputs(turns=req.chat(), images=list(req.images)))[0]
    llava.methods["carve"].rewrite([state], llava.passes)
    assert len(state.request.images) == count


# ---- attention map (diagnostics) -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny-random/llava", "tiny-random/qwen2-vl"])
@pytest.mark.parametrize("layers", [None, [1, 4]])
def test_attention_map_equals_a_stock_eager_forward(family, layers, images):
    """Each generated token's map is the attention of the row that produced it to the image tokens, mean over
    heads and the read layers, from a stock eager forward of prompt + generated tokens (no cache, no hooks)."""
    engine = Engine.from_pretrained(family)
    params = {} if layers is None else {"layers": layers}
    out = engine.generate_batch([GenerationRequest(prompt=QUESTIONS[2], images=[images[1]], max_new_tokens=6,
                                                   interventions={"attention_map": params})])[0]
    maps = out.diagnostics["attention_map"]["maps"]
    prompt = engine.encode(GenerationRequest(prompt=QUESTIONS[2], images=[images[1]]).chat(), [images[1]])
    batch = engine.collate([prompt])
    generated = torch.tensor([out.token_ids[:-1]])
    width = batch["input_ids"].shape[1]
    for key, value in list(batch.items()):  # per-token inputs (Qwen2-VL's token types) go on with text tokens
        if key != "input_ids" and value.dim() == 2 and value.shape[1] == width:
            batch[key] = torch.cat([value, torch.zeros_like(generated, dtype=value.dtype)], 1)
    batch["input_ids"] = torch.cat([batch["input_ids"], generated], 1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    stock = TINY_MODELS[family]()[0]
    stock.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = stock(**batch, output_attentions=True).attentions
    read = layers or list(range(len(attentions)))
    (start, end), = prompt.layout.image_spans
    rows, cols = prompt.layout.image_grids[0]
    assert len(maps) >= len(out.token_ids) and out.diagnostics["attention_map"]["grids"] == [[rows, cols]]
    for t in range(len(out.token_ids)):
        q = len(prompt.input_ids) - 1 + t
        expected = torch.stack([attentions[l][0, :, q, start:end].mean(0) for l in read]).mean(0).view(rows, cols)
        torch.testing.assert_close(torch.tensor(maps[t][0]), expected, atol=1e-5, rtol=1e-4)


def test_attention_map_matches_literal(llava, images):
    literal = llava.methods.with_methods(llava.methods.literal("attention_map"))
    fast_out = run(llava, images, {"attention_map": {"layers": [0, 3, 5]}}, n=2)
    engine = Engine.from_pretrained("tiny-random/llava", methods=literal)  # a model of its own: an engine claims its model's attention
    slow_out = run(engine, images, {"attention_map": {"layers": [0, 3, 5]}}, n=2)
    for fast, slow in zip(fast_out, slow_out):
        np.testing.assert_allclose(fast.diagnostics["attention_map"]["maps"], slow.diagnostics["attention_map"]["maps"], atol=1e-6)


def test_attention_map_reads_without_editing(llava, images):
    plain = run(llava, images, {}, n=3, logprobs=True)
    mapped = run(llava, images, {"attention_map": {}}, n=3, logprobs=True)
    for a, b in zip(plain, mapped):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)  # eager attention in read layers, not SDPA


# ---- every method changes the output distribution ------------------------------------------------
@pytest.mark.parametrize("name", [n for n, m in MethodRegistry.builtin().items() if not m.signal])
def test_method_changes_output(engine, images, name):
    if engine.unavailable(name):  # refused by name on this model (tested above)
        return
    base = run(engine, images, {}, n=4, logprobs=True)
    with_method = run(engine, images, {name: {}}, n=4, logprobs=True)
    moved = 0.0
    for a, b in zip(base, with_method):
        if a.token_ids != b.token_ids:
            moved = max(moved, 1.0)
        else:
            moved = max(moved, max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)))
    assert moved > 1e-3
