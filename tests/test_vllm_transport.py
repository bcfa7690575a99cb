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


def test_tensors_travel_with_their_values_dtypes_and_shapes():
    big = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3, dtype=torch.int64), "bool": torch.tensor([True, False]),
        "bf16": torch.randn(2, 3).to(torch.bfloat16), "int": torch.arange(5), "transposed": big.t(),
        "view": big[1],  # a view into a larger storage: torch's own pickling
        "same": big, "again": big,  # one tensor twice: one tensor back
    }
    state = RowState(hooks=MethodRegistry.builtin()["var"], data=tensors)
    back, = unpack_states(pack_states([state], b"k" * 32), b"k" * 32)
    for name, tensor in tensors.items():
        got = back.data[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), name
    assert back.data["same"] is back.data["again"]
    back.data["int"][0] = 7  # writable, and not the sender's memory
    assert tensors["int"][0] == 0
