"""Method states between the API process and vLLM's worker: pickled, signed with the engine's own key.

A request's :class:`~seeright.interventions.methods.base.RowState` objects (hooks, parameters, what the analysis
passes found, the prompt's layout) travel to the worker inside ``SamplingParams.extra_args``, and back (their
diagnostics) through ``collective_rpc``. Unpickling runs code, so the worker accepts only payloads signed with the
key the engine client handed it at install time: a client of some other front end (vLLM's own OpenAI server
forwards ``vllm_xargs`` into ``extra_args``) cannot make the worker unpickle its bytes.

Both ends pack and unpack on vLLM's engine loop or beside it (a request's states when it arrives, a finished one's
when its client collects them: between two steps of every running stream), so a CPU tensor that owns its storage
travels as its raw bytes, its dtype and its shape: torch's own pickling writes each storage through ``torch.save``,
some ten times slower for the many small tensors of an analysis pass (CARVE's attention maps: one per step). A view
into a larger storage keeps torch's pickling, which ships the storage once for all its views.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import pickle
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from seeright.interventions.methods.base import RowState

DIGEST = hashlib.sha256().digest_size


class EngineFailure(RuntimeError):
    """The worker could not run a request's methods exactly (a preempted request recomputed in one forward)."""


class _Pickler(pickle.Pickler):
    """Pickles a plain CPU tensor that owns its storage as its bytes (:func:`_tensor`); anything else as pickle does."""

    def reducer_override(self, obj: Any) -> Any:
        if (type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided
                and not obj.requires_grad and not obj.is_quantized and not obj.is_conj() and not obj.is_neg()
                and obj.untyped_storage().nbytes() == obj.numel() * obj.element_size()):
            flat = obj.detach().contiguous().reshape(-1)
            return _tensor, (flat.view(torch.uint8).numpy().tobytes(), obj.dtype, tuple(obj.shape))
        return NotImplemented


def _tensor(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor :class:`_Pickler` wrote (a copy of ``data``: writable, and its own storage)."""
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def pack(value: Any, key: bytes) -> bytes:
    """``value`` pickled and signed with ``key``."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    body = buffer.getvalue()
    return hmac.new(key, body, hashlib.sha256).digest() + body


def unpack(payload: bytes, key: bytes) -> Any:
    """The value of :func:`pack`; a ValueError when the payload is not signed with ``key``."""
    signature, body = payload[:DIGEST], memoryview(payload)[DIGEST:]
    if not hmac.compare_digest(signature, hmac.new(key, body, hashlib.sha256).digest()):
        raise ValueError("seeright states with a bad signature: refused")
    return pickle.loads(body)  # signed by this engine's key


def pack_states(states: Sequence[RowState], key: bytes) -> bytes:
    """``states`` without their request inputs (images, pixels: the hooks never read them while decoding)."""
    return pack([replace(s, request=None) for s in states], key)


def unpack_states(payload: bytes, key: bytes) -> list[RowState]:
    """The states of :func:`pack_states`; a ValueError when the payload is not signed with ``key``."""
    return unpack(payload, key)
