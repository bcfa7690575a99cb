"""``seeright loadtest``: a bounded load on a loopback server with mixed interventions.

The load is bounded by a request count and a duration, runs only against loopback addresses, mixes
interventions (none and each registered method that takes part in mixed loads) and streaming with non-streaming requests, and reports throughput,
latency percentiles, responses by status (and whether each 429/503 carried ``Retry-After``), and the
server's resident memory before and after (from its ``/metrics``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlparse

import httpx
import uvicorn
from PIL import Image

from seeright.interventions.registry import MethodRegistry
from seeright.service.engine import Engine
from seeright.service.settings import Settings


def mixed_interventions() -> tuple[dict[str, dict], ...]:
    """No method, then each built-in method of the mixed loads at its defaults."""
    return ({}, *({name: {}} for name in MethodRegistry.builtin().mixed_traffic()))


@dataclass
class LoadConfig:
    url: str
    model: str
    requests: int = 64
    concurrency: int = 8
    duration_s: float = 60.0
    max_tokens: int = 16
    stream_every: int = 2  # every n-th request streams
    api_key: str | None = None
    interventions: tuple[dict[str, dict], ...] = field(default_factory=mixed_interventions)  # request i gets [i % len]


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addresses or not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise ValueError(f"url: {host!r} is not a loopback address; the load test only targets this machine")


def _image_url(seed: int = 0) -> str:
    image = Image.new("RGB", (64, 48), ((seed * 50) % 255, 120, 200))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _served(client: httpx.AsyncClient, cfg: LoadConfig) -> LoadConfig:
    """``cfg`` without the intervention mixes naming a method the server says its model cannot run."""
    cards = (await client.get("/v1/interventions")).json().get("data", [])
    refused = {c["name"] for c in cards if c.get("unavailable")}
    kept = tuple(mix for mix in cfg.interventions if not refused & set(mix))
    return replace(cfg, interventions=kept or ({},))


async def _resident_bytes(client: httpx.AsyncClient) -> float | None:
    resp = await client.get("/metrics")
    for line in resp.text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    return None


async def _one(client: httpx.AsyncClient, cfg: LoadConfig, i: int) -> tuple[int, float, int, bool]:
    """(status, latency, completion tokens, Retry-After present) of request ``i``."""
    stream = cfg.stream_every > 0 and i % cfg.stream_every == 0
    body = {
        "model": cfg.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _image_url(i)}},
            {"type": "text", "text": f"Describe picture number {i}."},
        ]}],
        "max_tokens": cfg.max_tokens,
        "interventions": cfg.interventions[i % len(cfg.interventions)],
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code == 200 and stream:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
        else:
            payload = await resp.aread()
            if resp.status_code == 200:
                tokens = json.loads(payload)["usage"]["completion_tokens"]
        return resp.status_code, time.perf_counter() - start, tokens, "retry-after" in resp.headers


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def run_load(cfg: LoadConfig) -> dict:
    """Send up to ``cfg.requests`` requests from ``cfg.concurrency`` workers, for at most ``duration_s``."""
    require_loopback(cfg.url)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency)
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=120, limits=limits) as client:
        cfg = await _served(client, cfg)
        before = await _resident_bytes(client)
        results: list[tuple[int, float, int, bool]] = []
        counter = iter(range(cfg.requests))
        deadline = time.perf_counter() + cfg.duration_s
        start = time.perf_counter()

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                try:
                    results.append(await _one(client, cfg, i))
                except httpx.HTTPError:
                    results.append((0, 0.0, 0, False))  # connection-level failure

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        elapsed = time.perf_counter() - start
        after = await _resident_bytes(client)
    ok = [r for r in results if r[0] == 200]
    statuses = Counter(str(r[0]) for r in results)
    refused = [r for r in results if r[0] in (429, 503)]
    latencies = [r[1] for r in ok]
    return {
        "requests": len(results),
        "duration_s": elapsed,
        "throughput_rps": len(ok) / elapsed,
        "tokens_per_s": sum(r[2] for r in ok) / elapsed,
        "latency_s": {"p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95), "p99": _percentile(latencies, 99)},
        "status": dict(statuses),
        "server_errors": sum(1 for r in results if r[0] >= 500 and r[0] != 503 or r[0] == 0),
        "refused_without_retry_after": sum(1 for r in refused if not r[3]),
        "resident_bytes": {"before": before, "after": after},
    }


def table(runs: list[dict[str, Any]]) -> str:
    """Load-test runs as Markdown, one line per run."""
    rows = ["| run | requests | ok | refused (503) | 5xx | refusals without Retry-After | req/s | p50 / p95 / p99 latency (s) | resident MiB after |",
            "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        lat, status = r["latency_s"], {int(k): v for k, v in r["status"].items()}
        after = r["resident_bytes"]["after"]
        rows.append(f"| {i} | {r['requests']} | {status.get(200, 0)} | {status.get(503, 0)} | {r['server_errors']} | "
                    f"{r['refused_without_retry_after']} | {r['throughput_rps']:.1f} | "
                    f"{lat['p50']:.2f} / {lat['p95']:.2f} / {lat['p99']:.2f} | {'-' if after is None else f'{after / 2**20:.0f}'} |")
    return "\n".join(rows)


@contextmanager
def local_server(settings: Settings, engine: Engine | None = None) -> Iterator[str]:
    """Serve a new app on a free loopback port in a background thread; yields the base URL."""
    from seeright.service.api.app import create_app

    with local_server_app(create_app(settings, engine)) as url:
        yield url


@contextmanager
def local_server_app(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a background thread; yields the base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 300  # the vLLM engine takes a minute to start on a small CPU
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the local server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
