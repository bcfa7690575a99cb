"""Method states between the API process and vLLM's worker (no vLLM needed): signed, and refused unread when not."""

from __future__ import annotations

import pytest
import torch

from seeright.interventions.methods.base import RequestInputs, RowState
from seeright.interventions.registry import MethodRegistry
from seeright.service.vllm.transport import pack_states, unpack_states


def test_states_round_trip_without_their_inputs_and_forgeries_are_refused():
    var = MethodRegistry.builtin()["var"]
    state = RowState(hooks=var, params=var.params_model(), request=RequestInputs(turns=[], images=[]),
                     data={"sinks": torch.arange(4)}, diagnostics={"selected": torch.ones(2)})
    key = b"k" * 32
    payload = pack_states([state], key)
    back, = unpack_states(payload, key)
    assert type(back.hooks) is type(var) and back.params == state.params and back.request is None
    assert torch.equal(back.data["sinks"], state.data["sinks"]) and state.request is not None  # the original is kept
    with pytest.raises(ValueError, match="bad signature"):
        unpack_states(payload, b"x" * 32)
    with pytest.raises(ValueError, match="bad signature"):
        unpack_states(payload[:-1] + bytes([payload[-1] ^ 1]), key)
