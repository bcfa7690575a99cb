"""Every method's whole generation (tokens and the log-prob of every step) against an independent reference
(``independent_reference``: no code shared with ``interventions/``), on both tiny families, for every
parameter branch, with VAR's rho at 0.2 and 0.8 where its two conventions differ."""

from __future__ import annotations

import numpy as np
import torch
import pytest
from conftest import QUESTIONS, make_image
from independent_reference import (
    Prompt, ReferenceModel, carve_collect, carve_mask, carve_refine, cutoff, flipped, gift_generate, pai_boost,
    pai_cfg_generate, pai_generate, paint_generate, paint_tokens, ritual_generate, var_generate, vcd_generate,
    lookback_decoding_generate, vcd_noised, vemask_generate, vemask_map, vhr_generate, agser_signal, vif_generate,
)

from rouge_score import rouge_scorer

from seeright.interventions.adapters import ChatTurn
from seeright.model_zoo import builtin_model
from seeright.service.engine import Engine, GenerationRequest

NEW_TOKENS = 5
TOLERANCE = 1e-4
QUESTION = QUESTIONS[1]

CASES = [
    ("pai", {}), ("pai", {"alpha": 0.8, "layers": [1, 4]}), ("pai", {"cfg": True}),
    ("pai", {"cfg": True, "gamma": 2.0, "cfg_cutoff": 0.3, "alpha": 0.5}),
    ("paint", {}), ("paint", {"alpha": 0.4, "beta": 0.9, "local_token_ratio": 0.5, "summary_iqr": 0.3}),
    ("vemask", {}), ("vemask", {"mask_ratio": 0.5, "pgd_steps": 2, "epsilon": 0.05, "step_size": 0.02, "seed": 4}),
    ("vemask", {"threshold": 1.0, "random_start": False, "pgd_steps": 7}),
    ("vemask", {"mask_target": "keys", "include_cls": False, "preset": "fast"}), ("vemask", {"mask_ratio": 0.9, "pgd_steps": 3}),
    ("vcd", {}), ("vcd", {"alpha": 0.5, "beta": 0.2, "noise_step": 999, "seed": 3}),
    ("ritual", {"transform": "horizontal_flip"}), ("ritual", {"transform": "vertical_flip", "alpha": 1.0, "beta": 0.3}),
    ("var", {"rho": 0.2}), ("var", {"rho": 0.8}), ("var", {"rho": 0.8, "p": 0.9}),
    ("vhr", {}), ("vhr", {"outlier_filter": False}), ("vhr", {"prefill_positions": "last"}),
    ("vhr", {"prefill_positions": "last", "outlier_filter": False, "alpha": 3.0}),
    ("gift", {}), ("gift", {"content_words": "all"}), ("gift", {"saliency_pass": "separate", "head_fraction": 0.25}),
    ("carve", {}), ("carve", {"steps": "first"}), ("carve", {"requery": "refined"}),
    ("carve", {"steps": "first", "requery": "refined", "top_p": 0.4}),
    ("lookback_decoding", {}), ("lookback_decoding", {"candidates": 4, "chunk_tokens": 3, "seed": 7, "temperature": 0.6}),
    ("lookback_decoding", {"candidates": 6, "chunk_tokens": 4, "seed": 3, "detector_convention": "factual"}),
    ("lookback_decoding", {"chunk_tokens": 1, "top_p": 0.5, "detector_convention": "factual"}),
    ("vif", {}), ("vif", {"relay_ratio": 0.3, "tau": 1.3, "alpha_mid": 0.6, "alpha_deep": 0.5}),
    ("vif", {"relay": [0, 3, 7], "mid_layers": [1, 3], "deep_layers": [3, 4]}),
]


@pytest.fixture(scope="module", params=["tiny-random/llava", "tiny-random/qwen2-vl"])
def pair(request) -> tuple[Engine, ReferenceModel]:
    engine = Engine.from_pretrained(request.param)
    return engine, ReferenceModel(builtin_model(request.param)[0], engine.eos_token_ids())


def tokenised(engine: Engine, turns: list[ChatTurn], images: list) -> Prompt:
    encoded = engine.encode(turns, images)
    return Prompt(engine.collate([encoded]), engine.adapter.image_token_id, encoded.layout.query_span,
                  encoded.layout.content_positions)


def grid_of(engine: Engine, prompt: Prompt) -> tuple[int, int]:
    if "image_grid_thw" in prompt.inputs:
        merge = engine.model.config.vision_config.spatial_merge_size
        _, h, w = prompt.inputs["image_grid_thw"][0].tolist()
        return h // merge, w // merge
    side = int(round(len(prompt.image_positions) ** 0.5))
    return side, side


def reference_run(engine: Engine, ref: ReferenceModel, name: str, params, image):
    turns = [ChatTurn("user", QUESTION, 1)]
    if name == "pai" and params.cfg:
        text_only = tokenised(engine, [ChatTurn("user", QUESTION, 0)], [])
        return pai_cfg_generate(ref, tokenised(engine, turns, [image]), text_only, params, NEW_TOKENS)
    if name == "pai":
        return pai_generate(ref, tokenised(engine, turns, [image]), params, NEW_TOKENS)
    if name == "paint":
        prompt = tokenised(engine, turns, [image])
        tower = builtin_model(engine.model_id)[0].model.vision_tower  # a fresh stock copy, switched to eager
        feature = engine.model.config.vision_feature_layer % engine.model.config.vision_config.num_hidden_layers
        local, summary = paint_tokens(tower, prompt.inputs["pixel_values"], feature, params)
        return paint_generate(ref, prompt, local, summary, params, NEW_TOKENS)
    if name == "vemask":
        mean, std = engine.adapter.pixel_stats()
        return vemask_generate(ref, tokenised(engine, turns, [image]), mean, std, params, NEW_TOKENS)
    if name == "lookback_decoding":
        return lookback_decoding_generate(ref, tokenised(engine, turns, [image]), params, NEW_TOKENS)
    if name == "vif":
        return vif_generate(ref, tokenised(engine, turns, [image]), params, NEW_TOKENS)
    if name == "vcd":
        return vcd_generate(ref, tokenised(engine, turns, [image]), params, NEW_TOKENS)
    if name == "ritual":
        transformed = tokenised(engine, turns, [flipped(image, params.transform)])
        return ritual_generate(ref, tokenised(engine, turns, [image]), transformed, params, NEW_TOKENS)
    if name == "var":
        return var_generate(ref, tokenised(engine, turns, [image]), params, NEW_TOKENS)
    if name == "vhr":
        text_only = tokenised(engine, [ChatTurn("user", QUESTION, 0)], [])
        return vhr_generate(ref, tokenised(engine, turns, [image]), text_only, params, NEW_TOKENS)
    if name == "gift":
        return gift_generate(ref, tokenised(engine, turns, [image]), params, NEW_TOKENS)
    maps = {}
    for key, text in (("task", QUESTION), ("general", params.general_instruction)):
        prompt = tokenised(engine, [ChatTurn("user", text + params.collect_suffix, 1)], [image])
        maps[key] = carve_collect(ref, prompt, params.layers, params.collect_tokens)
    mask = carve_mask(maps["task"], maps["general"], grid_of(engine, prompt), image.size, params)
    refined = carve_refine(image, mask)
    images = [image, refined] if params.requery == "original_and_refined" else [refined]
    return ref.greedy(tokenised(engine, [ChatTurn("user", QUESTION, len(images))], images), NEW_TOKENS)


def check_against_reference(engine: Engine, ref: ReferenceModel, name: str, given: dict, image) -> None:
    params = engine.resolve_params({name: given})[name]
    fast = engine.generate_batch([GenerationRequest(prompt=QUESTION, images=[image], interventions={name: given},
                                                    max_new_tokens=NEW_TOKENS, logprobs=True)])[0]
    expected = reference_run(engine, ref, name, params, image)
    plain = ref.greedy(tokenised(engine, [ChatTurn("user", QUESTION, 1)], [image]), NEW_TOKENS)
    assert fast.token_ids == expected.tokens
    np.testing.assert_allclose(fast.logprobs, expected.logprobs, atol=TOLERANCE, rtol=0)
    steps = min(len(plain.logprobs), len(expected.logprobs))
    moved = np.abs(np.array(expected.logprobs[:steps]) - np.array(plain.logprobs[:steps])).max()
    assert moved > 1e-3 or expected.tokens != plain.tokens  # the method acts on this input: a no-op cannot pass
    if name == "vif":  # the relay tokens the response hands the next agent
        assert fast.diagnostics["vif"]["relay"] == expected.relay
    if name == "lookback_decoding":  # every chunk's scores, not only the picks they led to
        chunks = fast.diagnostics[name]["chunks"]
        assert len(chunks) == len(expected.chunk_probabilities)
        for got, want in zip(chunks, expected.chunk_probabilities):
            assert got.get("hallucination_probability") == (None if want is None else pytest.approx(want, abs=1e-4))


@pytest.mark.parametrize("name,given", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in g.items()) or 'defaults'}" for n, g in CASES])
def test_generation_matches_independent_reference(pair, name, given):
    engine, ref = pair
    if engine.unavailable(name):  # PAINT on a tower without [CLS], VE masking on a packed tower: refused by name (test_methods)
        return
    check_against_reference(engine, ref, name, given, make_image(3))


def test_vemask_threshold_is_the_releases_population_std(pair):
    """k placed between the most uncertain token's z-scores under the population and the sample std: the release's
    rule (population std, ``>=``) masks that token and the other reading would not, so the answers differ."""
    engine, ref = pair
    if engine.unavailable("vemask"):
        return
    image, given = make_image(3), {"pgd_steps": 3}
    params = engine.resolve_params({"vemask": given})["vemask"]
    prompt = tokenised(engine, [ChatTurn("user", QUESTION, 1)], [image])
    u = vemask_map(ref.model.model.vision_tower, prompt.inputs["pixel_values"].float(), *engine.adapter.pixel_stats(), params)[0]
    between = ((u.max() - u.mean()) / u.std() + (u.max() - u.mean()) / u.std(ddof=1)) / 2
    check_against_reference(engine, ref, "vemask", {**given, "threshold": float(between)}, image)


def test_attention_edit_composes_with_logit_contrast(pair):
    """PAI (attention edit) + VCD (logit contrast): the request's own row is edited, its noised branch is not."""
    engine, ref = pair
    image, given = make_image(3), {"pai": {"alpha": 0.6}, "vcd": {"seed": 2}}
    params = engine.resolve_params(given)
    fast = engine.generate_batch([GenerationRequest(prompt=QUESTION, images=[image], interventions=given,
                                                    max_new_tokens=NEW_TOKENS, logprobs=True)])[0]
    prompt = tokenised(engine, [ChatTurn("user", QUESTION, 1)], [image])
    pai, vcd = params["pai"], params["vcd"]
    expected = ref.contrast_greedy(
        prompt, vcd_noised(prompt, vcd), lambda own, noised: cutoff((1 + vcd.alpha) * own - vcd.alpha * noised, own, vcd.beta),
        NEW_TOKENS, edit=lambda: ref.hooks(score_edit=pai_boost(prompt, pai)),
    )
    vcd_only = vcd_generate(ref, prompt, vcd, NEW_TOKENS)
    assert fast.token_ids == expected.tokens
    np.testing.assert_allclose(fast.logprobs, expected.logprobs, atol=TOLERANCE, rtol=0)
    assert expected.tokens != vcd_only.tokens or np.abs(np.array(expected.logprobs) - vcd_only.logprobs).max() > 1e-3


@pytest.mark.parametrize(("convention", "window"), [("hallucinated", 1), ("factual", 3), ("hallucinated", 8)])
def test_lookback_detector_scores_as_the_release_slides_them(pair, convention: str, window: int) -> None:
    """A detector's scores from the returned ratio matrices, written out: each token from the ``window``-th on gets
    the logistic regression on the mean of the last ``window`` tokens' flattened ``[L, H]`` rows
    (``step03_lookback_lens.py``, ``convert_to_token_level``), as P(hallucinated): the complement of the sigmoid for a
    release classifier (label 1 = factual); earlier tokens get none."""
    engine, _ = pair
    info = engine.info
    rng = np.random.default_rng(window)
    weights, bias = rng.normal(size=info.num_layers * info.num_heads), 0.3
    params = {"features": True, "detector_weights": weights.tolist(), "detector_bias": bias,
              "detector_convention": convention, "window": window}
    out = engine.generate_batch([GenerationRequest(prompt=QUESTION, images=[make_image(2)], max_new_tokens=12,
                                                   interventions={"lookback": params})])[0]
    signal = out.diagnostics["lookback"]
    rows = [np.asarray(f, dtype=np.float64).ravel() for f in signal["features"]]
    expected = []
    for t in range(len(rows)):
        if t + 1 < window:
            expected.append(None)
            continue
        p = 1 / (1 + np.exp(-(np.mean(rows[t + 1 - window : t + 1], axis=0) @ weights + bias)))
        expected.append(1 - p if convention == "factual" else p)
    got = signal["hallucination_probability"]
    assert [g is None for g in got] == [e is None for e in expected] and len(got) == len(rows) > window
    assert [g for g in got if g is not None] == pytest.approx([e for e in expected if e is not None], abs=1e-5)


def test_ritual_crop_is_the_releases_square_on_llava_and_the_whole_crop_on_qwen() -> None:
    """RITUAL's ``resized_crop`` on a non-square image, written out as the release's ``RandomResizedCrop(size=S)``:
    the crop box from the same draws (area, aspect, position), resized bilinearly to S x S, where S is the side
    LLaVA's processor centre-crops to, so the processor keeps all of it; on Qwen2-VL (no crop) the crop comes back
    at the image's size. The branch's pixels are the processor's pixels of that image."""
    import random

    from PIL import Image

    from seeright.interventions import image_transforms as tf

    image = make_image(3, (60, 40))
    for model, square in (("tiny-random/llava", True), ("tiny-random/qwen2-vl", False)):
        engine = Engine.from_pretrained(model)
        side = engine.info.square_image
        assert (side is not None) is square
        left, top, w, h = tf.crop_box(*image.size, random.Random(7))  # the seed RITUAL gives the first image
        size = (side, side) if square else image.size
        expected = image.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BILINEAR)
        request = GenerationRequest(prompt=QUESTION, images=[image], interventions={"ritual": {"transform": "resized_crop", "seed": 7}})
        inputs, states = engine.admit([request])
        branch = states[0][0].data["contrast_prompt"]
        wanted = engine.encode(inputs[0].turns, [expected])
        assert torch.equal(branch.images["pixel_values"], wanted.images["pixel_values"])


AGSER_CASES = [{}, {"image": "split"}, {"unit": "token", "attention_from": "answer", "attentive_fraction": 0.5},
               {"image": "split", "layers": [0, 2], "lam": 0.5, "attentive_fraction": 0.3}]


@pytest.mark.parametrize("given", AGSER_CASES, ids=lambda g: "-".join(f"{k}={v}" for k, v in g.items()) or "defaults")
def test_agser_signal_matches_independent_reference(pair, given):
    """The answer is untouched; sub-queries, their answers, consistencies (ROUGE-L by Google's rouge-score) and the
    score equal the reference's."""
    engine, ref = pair
    image = make_image(3)
    params = engine.resolve_params({"agser": given})["agser"]
    fast = engine.generate_batch([GenerationRequest(prompt=QUESTION, images=[image], interventions={"agser": given},
                                                    max_new_tokens=NEW_TOKENS)])[0]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    run, want = agser_signal(
        ref, tokenised(engine, [ChatTurn("user", QUESTION, 1)], [image]), params, NEW_TOKENS, engine.decode_text,
        lambda question: tokenised(engine, [ChatTurn("user", question, 1)], [image]),
        lambda candidate, reference: scorer.score(reference, candidate)["rougeL"].fmeasure,
    )
    assert fast.token_ids == run.tokens
    got = fast.diagnostics["agser"]
    for key, value in want.items():
        assert got[key] == (pytest.approx(value, abs=1e-9) if isinstance(value, float) else value), key
    assert want["attentive_query"] and want["non_attentive_query"]
