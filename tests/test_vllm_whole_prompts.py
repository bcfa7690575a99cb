"""Which prompt rows of a method request vLLM must prefill in one chunk under its step budget (no vLLM needed): from
the first row its hooks act on (``prefill_tail``). Exactness under a split is tested on vLLM itself
(``tests/test_vllm_engine.py`` runs every method on a step budget below every prompt)."""

from __future__ import annotations

from seeright.interventions.registry import MethodRegistry
from seeright.service.engine import GenerationRequest
from seeright.service.vllm.worker import prefill_tail

# the first prompt row each method's hooks act on, from the prompt's layout
TAILS = {
    "vhr": lambda layout: 0,  # every row's heads
    "gift": lambda layout: layout.query_span[0] - 1,  # its fused saliency: the question's rows' attention
    # the attention of the rows after the image (VAR: its sinks are read from every row's residual stream, which the
    # worker keeps across chunks)
    "var": lambda layout: layout.image_end, "vif": lambda layout: layout.image_end,
    **dict.fromkeys(["pai", "paint", "attention_map", "agser"], lambda layout: layout.length - 1),  # the last row's
    # from the first decode step on
    **dict.fromkeys(["carve", "vemask", "ritual", "vcd", "lookback", "lookback_decoding"], lambda layout: layout.length),
}


def test_a_prompt_runs_in_one_chunk_from_the_first_row_its_hooks_act_on(llava, images):
    assert set(TAILS) == set(MethodRegistry.builtin())
    for name, expected in TAILS.items():
        inputs, rows = llava.admit([GenerationRequest(prompt="What is in the image?", images=[images[0]],
                                                      interventions={name: {}})])
        layout = inputs[0].prompt.layout
        for state in rows[0]:
            state.layout = layout
        assert 0 < layout.image_end < layout.query_span[0] < layout.length - 1
        assert prefill_tail(rows[0], range(llava.info.num_layers)) == expected(layout), name
