"""Interventions off: token ids identical to stock ``model.generate`` (single and batch)."""

from __future__ import annotations

from conftest import QUESTIONS

from seeright.service.engine import GenerationRequest


def _stock_generate(engine, stock, requests, max_new_tokens):
    prompts = [engine.encode(r.chat(), r.images) for r in requests]
    batch = engine.collate(prompts)
    out = stock.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.eos_token_ids(),
    )
    return [seq[batch["input_ids"].shape[1]:].tolist() for seq in out]


def _trim(tokens, eos):
    out = []
    for t in tokens:
        out.append(t)
        if t in eos:
            break
    return out


def test_single_matches_stock(engine, stock_models, images):
    stock = stock_models[engine.model_id]
    assert stock.config.get_text_config()._attn_implementation == "sdpa"
    for q, im in zip(QUESTIONS, images):
        req = GenerationRequest(prompt=q, images=[im], max_new_tokens=16)
        ours = engine.generate_batch([req])[0].token_ids
        ref = _trim(_stock_generate(engine, stock, [req], 16)[0], set(engine.eos_token_ids()))
        assert ours == ref


def test_batch_matches_stock(engine, stock_models, images):
    stock = stock_models[engine.model_id]
    reqs = [GenerationRequest(prompt=q, images=[im], max_new_tokens=12) for q, im in zip(QUESTIONS, images)]
    ours = [o.token_ids for o in engine.generate_batch(reqs)]
    ref = [_trim(t, set(engine.eos_token_ids())) for t in _stock_generate(engine, stock, reqs, 12)]
    assert ours == ref
    assert len({len(engine.encode(r.chat(), r.images).input_ids) for r in reqs}) > 1  # real padding happened


def test_text_only_request_matches_stock(engine, stock_models):
    stock = stock_models[engine.model_id]
    req = GenerationRequest(prompt="Tell me a story.", max_new_tokens=10)
    ref = _trim(_stock_generate(engine, stock, [req], 10)[0], set(engine.eos_token_ids()))
    assert engine.generate_batch([req])[0].token_ids == ref
