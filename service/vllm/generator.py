"""``VllmGenerator``: the evaluation runner's generator (``seeright.eval.runner.Generator``) on the vLLM engine.

``seeright eval shapes --engine vllm`` runs the shapes testbed's rows through a :class:`VllmEngineClient` in
process, as ``EngineGenerator`` runs them through the transformers engine: greedy, each batch's prompts sent at
once (vLLM batches them), on the base model or one LoRA adapter. The client's event loop runs in a thread of its
own, so the runner's synchronous calls wait on it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from PIL import Image

from seeright.service.requests import GenerationRequest
from seeright.service.settings import Settings
from seeright.service.vllm.engine import VllmEngineClient


class VllmGenerator:
    """Greedy generations on a started :class:`VllmEngineClient` whose loop runs in another thread."""

    def __init__(self, client: VllmEngineClient, loop: asyncio.AbstractEventLoop, adapter: str | None = None) -> None:
        self.client, self.loop, self.adapter = client, loop, adapter

    @classmethod
    @contextmanager
    def started(cls, settings: Settings) -> Iterator[VllmGenerator]:
        """Start vLLM (hooked) on ``settings`` in a loop thread; stop it on exit."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="seeright-vllm-loop", daemon=True)
        thread.start()
        client = VllmEngineClient.from_settings(settings)
        try:
            asyncio.run_coroutine_threadsafe(client.start(), loop).result()
            yield cls(client, loop)
        finally:
            asyncio.run_coroutine_threadsafe(client.stop(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)

    def on_adapter(self, adapter: str) -> VllmGenerator:
        """The same generator on a served LoRA adapter."""
        return VllmGenerator(self.client, self.loop, adapter)

    def generate(
        self, prompts: Sequence[str], images: Sequence[Image.Image], interventions: dict[str, Any], max_new_tokens: int
    ) -> list[str]:
        requests = [GenerationRequest(prompt=p, images=[im], interventions=interventions, max_new_tokens=max_new_tokens,
                                      adapter=self.adapter) for p, im in zip(prompts, images)]

        async def run() -> list[str]:
            outs = await asyncio.gather(*(self.client.generate(r, wait_for_room=True) for r in requests))
            return [out.text for out in outs]

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()
