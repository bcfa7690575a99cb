"""Which method requests vLLM may prefill in chunks under its step budget (no vLLM needed): those whose hooks act
on the prompt at its last row at most. Exactness under a split is tested on vLLM itself (``tests/test_vllm_engine.py``
runs every method on a step budget below every prompt)."""

from __future__ import annotations

from seeright.interventions.registry import MethodRegistry
from seeright.service.engine import GenerationRequest
from seeright.service.vllm.worker import reads_prefill

# the residual stream at prefill (VAR's sinks, GIFT's fused saliency), every prompt row's heads (VHR), the
# attention of the rows after the image (ViF)
WHOLE = {"var", "vhr", "gift", "vif"}


def test_only_hooks_on_prompt_rows_before_the_last_keep_a_prompt_whole(llava, images):
    split = set()
    for name in MethodRegistry.builtin():
        inputs, rows = llava.admit([GenerationRequest(prompt="What is in the image?", images=[images[0]],
                                                      interventions={name: {}})])
        for state in rows[0]:
            state.layout = inputs[0].prompt.layout
        if not reads_prefill(rows[0], range(llava.info.num_layers)):
            split.add(name)
    assert split == set(MethodRegistry.builtin()) - WHOLE
    assert {"pai", "paint", "attention_map", "agser"} <= split  # their last prompt row's attention only

