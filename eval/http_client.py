"""The runner's generator over HTTP: a running seeright (or any OpenAI-compatible) server."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image


def image_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class HttpGenerator:
    """Sends a batch as concurrent chat completions (greedy), so the server can micro-batch them (or spread them
    over its replicas); a 503 is retried after its ``Retry-After``, up to ``retries`` times."""

    def __init__(
        self, endpoint: str, model: str, api_key: str | None = None, timeout: float = 600.0, retries: int = 60
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = retries
        self.client = httpx.Client(base_url=endpoint.rstrip("/"), headers=headers, timeout=timeout)
        self.model = model

    def _one(self, prompt: str, image: Image.Image, interventions: dict[str, dict], max_new_tokens: int) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": prompt},
            ]}],
            "max_tokens": max_new_tokens,
            "temperature": 0,
            "interventions": interventions,
        }
        for _ in range(self.retries):  # 503: at capacity, or a replica lost; the server says when to retry
            resp = self.client.post("/v1/chat/completions", json=body)
            if resp.status_code != 503:
                break
            time.sleep(float(resp.headers.get("retry-after", 1)))
        if resp.status_code != 200:
            raise RuntimeError(f"server answered {resp.status_code}: {resp.text[:500]}")
        return resp.json()["choices"][0]["message"]["content"]

    def generate(
        self, prompts: Sequence[str], images: Sequence[Image.Image], interventions: dict[str, dict], max_new_tokens: int
    ) -> list[str]:
        with ThreadPoolExecutor(max(1, len(prompts))) as pool:
            futures = [pool.submit(self._one, p, im, interventions, max_new_tokens) for p, im in zip(prompts, images)]
            return [f.result() for f in futures]
