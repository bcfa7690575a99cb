"""The SENTINEL-style trainer's pieces against literal versions: where a caption's first "sentence" ends, the answer
log-probs C-DPO scores (the context's tokens unscored), and the loss (DPO's formula written out)."""

from __future__ import annotations

import math

import torch
from conftest import make_image

from seeright.service.engine import Engine, GenerationRequest
from seeright.testbed.train_sentinel import c_dpo_loss, first_unit, sequence_logps


def test_first_unit_ends_at_the_first_object_word(llava: Engine):
    tokenizer = llava.tokenizer
    eos = set(llava.eos_token_ids())
    ids = tokenizer("There is a red square, a blue moon and", add_special_tokens=False)["input_ids"]
    unit, name = first_unit(tokenizer, ids, eos)
    assert name == "square" and tokenizer.decode(unit).endswith("square")
    ids = tokenizer(" and two crescents.", add_special_tokens=False)["input_ids"]
    assert first_unit(tokenizer, ids, eos)[1] == "moon"  # synonyms and plurals
    assert first_unit(tokenizer, tokenizer(" and a gre", add_special_tokens=False)["input_ids"], eos) is None
    cut = tokenizer(" a green st", add_special_tokens=False)["input_ids"]
    assert first_unit(tokenizer, cut, eos) is None  # the budget cut the word: it may still become "star"
    assert first_unit(tokenizer, [*cut, min(eos)], eos) is None  # ended, but "st" is no object


def test_sequence_logps_score_the_answer_only(llava: Engine):
    image = make_image(2)
    prompt = llava.encode(GenerationRequest(prompt="Describe the picture.", images=[image]).chat(), [image])
    contexts, answers = [[40, 41, 42], []], [[7, 8], [9, 10, 11]]
    with torch.no_grad():
        fast = sequence_logps(llava.model, llava, [prompt, prompt], contexts, answers)
        for b, (context, answer) in enumerate(zip(contexts, answers)):
            total = 0.0
            for t, token in enumerate(answer):  # one forward per answer token, unpadded
                ids = torch.cat([prompt.input_ids, torch.tensor(context + answer[:t], dtype=torch.long)])[None]
                logits = llava.model(input_ids=ids, attention_mask=torch.ones_like(ids), **prompt.images).logits[0, -1]
                total += float(torch.log_softmax(logits.float(), -1)[token])
            assert math.isclose(float(fast[b]), total, abs_tol=1e-4)


def test_c_dpo_loss_is_dpo_on_the_continuations():
    pw, pl, rw, rl = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0]), torch.tensor([-2.5, -1.5]), torch.tensor([-2.5, -3.0])
    loss = c_dpo_loss(pw, pl, rw, rl, beta=0.1)
    for i in range(2):
        margin = 0.1 * ((float(pw[i]) - float(rw[i])) - (float(pl[i]) - float(rl[i])))
        assert math.isclose(float(loss[i]), math.log(1 + math.exp(-margin)), rel_tol=1e-6)
