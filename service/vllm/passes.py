"""The methods' extra passes (:class:`~seeright.interventions.methods.base.Passes`) as requests to vLLM.

Admission (:meth:`seeright.service.admission.Admission.admit`) runs in a thread of its own; when a method's
``rewrite`` or ``prepare`` asks for a prefill or a greedy generation, each prompt becomes a vLLM request that
carries the pass's states (a capture hook, the method's own hooks) to the worker, and the call waits for its
result on the event loop: the tokens, and the states as the hooks left them (what they captured, the layout
they ran on). A pass runs every layer (vLLM cannot stop a forward after a given layer); its result is the same.

Prompts go to vLLM with one placeholder per image and the images themselves, as vLLM expects; ``encode``
remembers each prompt's chat and images for that, the admission's own prompt included. The vision tower's own
passes (``cls_attention``, ``vision_states``) run on the engine client's copy of the tower, not in vLLM, in turn
with vLLM's steps where the engine client pauses them (:mod:`seeright.service.vllm.pauses`): a thread that holds
the engine lets it go before it waits on a pass.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
from PIL import Image

from seeright.interventions.adapters import ChatTurn, EncodedPrompt, ModelAdapter, ModelInfo
from seeright.interventions.memo import Memo
from seeright.interventions.methods.base import RowState

T = TypeVar("T")
Run = Callable[[list[ChatTurn], list[Image.Image], Sequence[RowState], int], Awaitable[tuple[list[int], list[RowState]]]]


class VllmPasses:
    """Passes on vLLM for one engine client: ``run(turns, images, states, max_tokens)`` is its greedy request."""

    def __init__(self, encode: Callable[[list[ChatTurn], list[Image.Image]], EncodedPrompt],
                 decode: Callable[[list[int]], str], info: ModelInfo, eos: list[int], run: Run,
                 loop: asyncio.AbstractEventLoop, tower: ModelAdapter | None = None,
                 let_go: Callable[[], None] | None = None, reached: Callable[[str], None] | None = None) -> None:
        self.info = info
        self.decode_text = decode
        self._encode, self._eos, self._run, self._loop, self._tower = encode, eos, run, loop, tower
        self._let_go = let_go  # lets the engine go where the calling thread holds it (:mod:`.pauses`)
        self._reached = reached  # the runtime's progress hooks: where a paused admission may hold the engine
        self._sources: dict[int, tuple[weakref.ref, list[ChatTurn], list[Image.Image]]] = {}
        self._sources_lock = threading.Lock()  # admissions encode in threads of their own
        self.cache = Memo()

    def encode(self, turns: list[ChatTurn], images: list[Image.Image]) -> EncodedPrompt:
        """The prompt's tokens and images, after the runtime's progress hooks at ``"admission encode"`` (with the step
        budget on, the admission holds the engine between two steps while it prepares the images and text: that
        work's Python holds the API process's GIL, and the event loop that reads vLLM's outputs waits on it)."""
        if self._reached is not None:
            self._reached("admission encode")
        prompt = self._encode(turns, images)
        with self._sources_lock:
            self._sources = {k: v for k, v in self._sources.items() if v[0]() is not None}
            self._sources[id(prompt)] = (weakref.ref(prompt), list(turns), list(images))
        return prompt

    def source(self, prompt: EncodedPrompt) -> tuple[list[ChatTurn], list[Image.Image]]:
        """The chat and images ``prompt`` was encoded from (by :meth:`encode`)."""
        with self._sources_lock:
            ref, turns, images = self._sources.get(id(prompt), (None, [], []))
        if ref is None or ref() is not prompt:
            raise RuntimeError("a pass got a prompt that was not encoded by these passes")
        return turns, images

    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    def prefill(self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], stop_after_layer: int | None) -> None:
        self._passes(prompts, rows, 1)

    def greedy(self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], max_new_tokens: int) -> list[list[int]]:
        return self._passes(prompts, rows, max_new_tokens)

    def _passes(self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], max_tokens: int) -> list[list[int]]:
        """Every prompt as a request of its own, all at once; each row's states take what the worker's hooks left."""
        for prompt, states in zip(prompts, rows):
            for state in states:
                state.layout = prompt.layout

        async def run_all() -> list[tuple[list[int], list[RowState]]]:
            return await asyncio.gather(*(self._run(*self.source(p), states, max_tokens) for p, states in zip(prompts, rows)))

        if self._let_go is not None:
            self._let_go()
        results = asyncio.run_coroutine_threadsafe(run_all(), self._loop).result()
        for states, (_, back) in zip(rows, results):
            for state, returned in zip(states, back):
                state.data, state.diagnostics, state.layout = returned.data, returned.diagnostics, returned.layout
        return [tokens for tokens, _ in results]

    # the vision tower's own passes run on the client's copy of the tower (the adapter of a weightless engine whose
    # tower and projector have their weights: Engine.load_tower); without one, the methods that need them are
    # refused before admission
    @property
    def tower(self) -> ModelAdapter:
        if self._tower is None:
            raise RuntimeError("this engine client has not loaded the model's vision tower")
        return self._tower

    def cls_attention(self, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tower.cls_attention(images)

    def vision_states(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[int, Any]:
        return self.tower.vision_states(pixel_values, layers)

    def pixel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tower.pixel_stats()

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        return self.cache.get(key, compute)
