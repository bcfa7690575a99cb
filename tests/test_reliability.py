"""Reliability under load, shutdown, hostile input and fuzzing, against real loopback servers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import FileResponse
from PIL import Image
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from seeright.service.engine import Engine
from seeright.service.settings import Settings
from seeright.tools.loadtest import LoadConfig, local_server, require_loopback, run_load

MODEL = "tiny-random/llava"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(MODEL)


def test_overload_is_refused_with_retry_after_and_memory_stays_flat(engine):
    settings_ = Settings(model=MODEL, queue_size=4, max_batch_size=2, max_tokens_limit=32)
    with local_server(settings_, engine) as url:
        # capacity is 4 queued + 2 running: 12 concurrent clients are twice that
        cfg = LoadConfig(url, MODEL, requests=48, concurrency=12, duration_s=60, max_tokens=8)
        runs = [asyncio.run(run_load(cfg)) for _ in range(3)]
    for run in runs:
        assert run["server_errors"] == 0, run["status"]
        assert run["refused_without_retry_after"] == 0
        assert run["status"].get("200", 0) > 0 and run["status"].get("503", 0) > 0, run["status"]
        assert run["latency_s"]["p99"] is not None
    growth = runs[-1]["resident_bytes"]["after"] - runs[0]["resident_bytes"]["after"]
    assert growth < 64 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over repeated runs"


def test_load_test_refuses_non_loopback_targets():
    with pytest.raises(ValueError, match="loopback"):
        require_loopback("http://10.0.0.1:8000")
    require_loopback("http://127.0.0.1:8000")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests_then_exits():
    port = _free_port()
    env = {**os.environ, "SEERIGHT_MAX_TOKENS_LIMIT": "3000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "seeright.cli", "serve", "--model", MODEL, "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.1)
        result = {}

        def long_request():
            image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
            body = {"model": MODEL, "max_tokens": 2500, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe it."}]}]}
            result["response"] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)

        client = threading.Thread(target=long_request)
        client.start()
        time.sleep(0.5)  # the request is generating now
        proc.send_signal(signal.SIGTERM)
        client.join(120)
        # uvicorn re-raises the signal after a graceful shutdown, so the exit status names SIGTERM
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode()
        assert "Application shutdown complete" in log
        response = result["response"]
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 2500 or response.json()["choices"][0]["finish_reason"] == "stop"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_remote_urls_never_reach_loopback_or_private_hosts(engine, tmp_path):
    from seeright.service.api.images import REMOTE_FAILED
    from seeright.tools.loadtest import local_server_app

    # a real image on loopback: a request that reached it would be answered
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    images = FastAPI()
    images.get("/x.png")(lambda: FileResponse(png))
    with local_server_app(images) as image_url, local_server(Settings(model=MODEL, allow_remote_urls=True), engine) as url:
        for target in (f"{image_url}/x.png", "http://localhost/x.png", "http://10.1.2.3/x.png", "http://[::1]/x.png",
                       "http://100.100.100.200/x.png", "http://[2002:7f00:1::]/x.png"):
            body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": target}}, {"type": "text", "text": "hi"}]}]}
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["message"].endswith(REMOTE_FAILED), (target, r.text)


def test_oversized_headers_are_refused_and_the_server_keeps_serving(engine):
    with local_server(Settings(model=MODEL), engine) as url:
        try:
            r = httpx.get(f"{url}/health", headers={"X-Big": "a" * 200_000}, timeout=10)
            assert 400 <= r.status_code < 500
        except httpx.HTTPError:
            pass  # the server may also just close the connection
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def fuzz_operation(operation, failures: list, statuses: Counter) -> None:
    """Hypothesis-generated requests, schema-valid and schema-violating, for one operation; records any
    5xx other than 503. Valid chat requests name the served model half of the time, so they get past
    the model check into image decoding, validation and generation."""
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode), served=st.booleans())
        def fuzz(case, served):
            if served and mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            response = case.call(timeout=30)
            statuses[(operation.label, response.status_code)] += 1
            if response.status_code >= 500 and response.status_code != 503:
                failures.append((operation.label, response.status_code, response.text[:200]))

        try:
            fuzz()
        except Unsatisfiable:  # no way to violate the schema of an operation without inputs
            pass


def test_fuzzing_the_openapi_schema_finds_no_server_error(engine):
    with local_server(Settings(model=MODEL, max_tokens_limit=8, default_max_tokens=4), engine) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        failures = []
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/evaluations"}
        statuses: Counter = Counter()
        for operation in operations:
            fuzz_operation(operation, failures, statuses)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert not failures, failures[:5]
    chat = {code for (label, code) in statuses if label == "POST /v1/chat/completions"}
    assert {400, 404} <= chat  # the fuzzer reached past the model check
