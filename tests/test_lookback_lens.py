"""The Lookback Lens detector of the shapes testbed (``seeright.testbed.lookback_lens``): its parts against definitions
written out here, a small end-to-end run, and the shipped detector in the served signal."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from seeright.service.engine import Engine, GenerationRequest
from seeright.testbed import lookback_lens as ll
from seeright.testbed import world


def test_auroc_is_the_share_of_positive_negative_pairs_ordered_right():
    rng = np.random.default_rng(1)
    scores, labels = rng.integers(0, 5, 40).astype(float), rng.integers(0, 2, 40)
    pairs = [(p, n) for p, n in itertools.product(scores[labels == 1], scores[labels == 0])]
    assert ll.auroc(scores, labels) == pytest.approx(sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs))
    assert ll.auroc(np.array([1.0, 2.0]), np.array([0, 1])) == 1.0 and ll.auroc(np.array([2.0, 1.0]), np.array([0, 1])) == 0.0


def test_fit_meets_the_optimality_conditions_of_sklearns_default_objective():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 6))
    y = (x @ rng.normal(size=6) + rng.normal(size=200) > 0).astype(float)
    w, b = ll.fit(x, y, c=1.0)
    p = 1 / (1 + np.exp(-(x @ w + b)))
    np.testing.assert_allclose(w + x.T @ (p - y), 0, atol=1e-6)  # d/dw [0.5 |w|^2 + C sum log-loss] = 0
    assert abs((p - y).sum()) < 1e-6  # d/db: the bias is not penalised


def test_mentions_are_labelled_by_the_scene_with_synonyms_and_plurals():
    text = "There is a red disc and two blue stars and a moon."
    words = [m for m in text.split(" ")]
    spans, end = [], 0
    for word in words:  # one token per word, with its leading space
        start = end
        end = start + len(word) + (1 if start else 0)
        spans.append((start, end))
    features = [np.full((2, 2), i, dtype=float) for i in range(len(words) - 1)]  # the last token has no row
    found = ll.mentions_of(0, text, spans, features, {"circle", "star"})
    assert [(m.word, m.hallucinated) for m in found] == [("disc", False), ("stars", False)]  # "moon." is the last token
    assert found[0].features.tolist() == [4.0] * 4  # "disc" is token 4: its own query row


def test_a_small_run_and_the_shipped_detector_in_the_signal():
    engine = Engine.from_pretrained("seeright/shapes-llava")
    result = ll.run(engine, train_seed=11, test_seed=12, n_images=24)
    assert result["train"]["mentions"] > 20 and 0 <= result["auroc"] <= 1 and result["auroc_interval95"] >= 0
    scene = world.generate_scenes(1, 12)[0]
    out = engine.generate_batch([GenerationRequest(prompt=world.CAPTION_PROMPT, images=[world.render(scene, 12)],
                                                   max_new_tokens=20, interventions={"lookback": {"features": True}})])[0]
    signal = out.diagnostics["lookback"]
    shipped = engine.resolve_params({"lookback": {}})["lookback"]
    rows, w = [np.asarray(f).ravel() for f in signal["features"]], shipped.window  # the release's sliding window
    expected = [torch.sigmoid(torch.tensor(np.mean(rows[t + 1 - w : t + 1], axis=0) @ np.asarray(shipped.detector_weights)
                                           + shipped.detector_bias)).item() for t in range(w - 1, len(rows))]
    got = signal["hallucination_probability"]
    assert shipped.detector_convention == "hallucinated" and got[: w - 1] == [None] * (w - 1)
    assert got[w - 1 :] == pytest.approx(expected, abs=1e-5) and len(got) == len(out.token_ids) - 1
