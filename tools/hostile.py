"""``seeright loadtest --hostile``: what one hostile client can do to everyone else.

Each probe is one request that a single client can send cheaply (huge stop strings, a log-prob storm, a long
evaluation ``split`` list, out-of-range seeds, NUL bytes in paths, a megabyte prompt). While it runs, ``/health``
is polled every 0.2 s from a second connection; the probe reports the request's status, how long it took, the
worst ``/health`` latency seen meanwhile (what every other client waited), and whether the server still answers a
plain request afterwards. Loopback servers only, like the load test.
"""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from seeright.tools.loadtest import require_loopback

POLL_S = 0.2
AFTER_TIMEOUT_S = 60.0  # a plain request after the probe: a server that cannot answer it in this long is not serving


@dataclass(frozen=True)
class Probe:
    """One hostile request: a name, the method and path, and the body (given the served model's name)."""

    name: str
    method: str
    path: str
    body: Callable[[str], dict[str, Any]]


def _image_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(model: str, text: str = "Describe the image.", image: str | None = None, **fields: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image or _image_url()}},
                                     {"type": "text", "text": text}]
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


PROBES = (
    Probe("streamed n=4 with four 100,000-character stop strings", "POST", "/v1/chat/completions",
          lambda m: _chat(m, stream=True, n=4, temperature=1.0, max_tokens=64, stop=[c * 100_000 for c in "abcd"])),
    Probe("streamed n=4 with four 1,000-character stop strings (the limit), 256 tokens", "POST", "/v1/chat/completions",
          lambda m: _chat(m, stream=True, n=4, temperature=1.0, max_tokens=256, stop=[c * 1_000 for c in "abcd"])),
    Probe("n=16, max_tokens=512, logprobs with top_logprobs=20", "POST", "/v1/chat/completions",
          lambda m: _chat(m, n=16, max_tokens=512, temperature=1.0, logprobs=True, top_logprobs=20)),
    Probe('evaluation with "split": ["random"] x 1000', "POST", "/v1/evaluations",
          lambda m: {"benchmark": "pope", "split": ["random"] * 1000, "limit": 1}),
    Probe('"seed": 2**64 with temperature 1', "POST", "/v1/chat/completions",
          lambda m: _chat(m, seed=2**64, temperature=1.0, max_tokens=4)),
    Probe("image URL file:///tmp/a\\u0000b.png", "POST", "/v1/chat/completions",
          lambda m: _chat(m, image="file:///tmp/a\u0000b.png", max_tokens=4)),
    Probe("evaluation images with a NUL byte", "POST", "/v1/evaluations",
          lambda m: {"benchmark": "pope", "images": "a\u0000b", "limit": 1}),
    Probe("a prompt of 1,000,000 characters", "POST", "/v1/chat/completions",
          lambda m: _chat(m, text="a " * 500_000, max_tokens=4)),
)


def _poll_health(url: str, stop: threading.Event, worst: list[float]) -> None:
    """Poll ``/health`` every ``POLL_S`` until ``stop``, keeping the worst latency in ``worst[0]``. It runs in a
    thread of its own, so that reading the probe's response in this process cannot delay it."""
    with httpx.Client(base_url=url) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                client.get("/health", timeout=120)
            except httpx.HTTPError:
                pass
            worst[0] = max(worst[0], time.perf_counter() - start)
            stop.wait(POLL_S)


async def run_probe(url: str, model: str, probe: Probe, headers: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Send one probe while polling ``/health``; then check that a plain request still gets its answer."""
    stop, worst = threading.Event(), [0.0]
    poller = threading.Thread(target=_poll_health, args=(url, stop, worst), daemon=True)
    poller.start()
    async with httpx.AsyncClient(base_url=url, headers=headers) as attacker:
        await asyncio.sleep(POLL_S)
        start = time.perf_counter()
        try:
            response = await attacker.request(probe.method, probe.path, json=probe.body(model), timeout=timeout_s)
            await response.aread()
            status: int | str = response.status_code
            message = response.text[:200] if status >= 400 else ""
        except httpx.HTTPError as exc:
            status, message = type(exc).__name__, str(exc)[:200]
        took = time.perf_counter() - start
        await asyncio.sleep(POLL_S)
        stop.set()
        poller.join()
        try:
            after = await attacker.post("/v1/chat/completions", json=_chat(model, max_tokens=2), timeout=AFTER_TIMEOUT_S)
            serving = after.status_code == 200
        except httpx.HTTPError:  # still busy with the probe, or gone
            serving = False
    return {"probe": probe.name, "status": status, "message": message, "request_s": took,
            "health_worst_s": worst[0], "serving_after": serving}


async def run(url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Every probe, one after another, against the server at ``url``."""
    require_loopback(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return [await run_probe(url, model, probe, headers, timeout_s) for probe in PROBES]


def table(rows: list[dict[str, Any]]) -> str:
    """The probes as Markdown: status, the request's time, the worst ``/health`` latency meanwhile."""
    lines = ["| what one client sent | status | request | worst `/health` latency meanwhile | serving after |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['probe']} | {r['status']} | {r['request_s']:.2f} s | {r['health_worst_s']:.2f} s | "
                     f"{'yes' if r['serving_after'] else 'no'} |")
    return "\n".join(lines)


@contextmanager
def spawned_server(model: str, port: int, image_dir: Path) -> Iterator[str]:
    """``seeright serve`` in a process of its own (so that the probes' client does not share its interpreter)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "seeright.cli", "serve", "--model", model, "--port", str(port),
         "--allowed-image-dir", str(image_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the server exited while starting")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the server did not start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
