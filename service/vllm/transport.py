"""Method states between the API process and vLLM's worker: pickled, signed with the engine's own key.

A request's :class:`~seeright.interventions.methods.base.RowState` objects (hooks, parameters, what the analysis
passes found, the prompt's layout) travel to the worker inside ``SamplingParams.extra_args``, and back (their
diagnostics) through ``collective_rpc``. Unpickling runs code, so the worker accepts only payloads signed with the
key the engine client handed it at install time: a client of some other front end (vLLM's own OpenAI server
forwards ``vllm_xargs`` into ``extra_args``) cannot make the worker unpickle its bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from seeright.interventions.methods.base import RowState

DIGEST = hashlib.sha256().digest_size


class EngineFailure(RuntimeError):
    """The worker could not run a request's methods exactly (a preempted request recomputed in one forward)."""


def pack(value: Any, key: bytes) -> bytes:
    """``value`` pickled and signed with ``key``."""
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return hmac.new(key, body, hashlib.sha256).digest() + body


def unpack(payload: bytes, key: bytes) -> Any:
    """The value of :func:`pack`; a ValueError when the payload is not signed with ``key``."""
    signature, body = payload[:DIGEST], payload[DIGEST:]
    if not hmac.compare_digest(signature, hmac.new(key, body, hashlib.sha256).digest()):
        raise ValueError("seeright states with a bad signature: refused")
    return pickle.loads(body)  # signed by this engine's key


def pack_states(states: Sequence[RowState], key: bytes) -> bytes:
    """``states`` without their request inputs (images, pixels: the hooks never read them while decoding)."""
    return pack([replace(s, request=None) for s in states], key)


def unpack_states(payload: bytes, key: bytes) -> list[RowState]:
    """The states of :func:`pack_states`; a ValueError when the payload is not signed with ``key``."""
    return unpack(payload, key)
