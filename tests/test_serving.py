"""A real server on loopback: a client that leaves mid-stream frees its slot; the scheduler isolates faults."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import make_image
from test_api import MODEL, data_url, user

from seeright.service.api.app import create_app
from seeright.service.engine import Engine, GenerationRequest
from seeright.service.scheduler import Job, Scheduler
from seeright.service.settings import Settings
from seeright.tools.loadtest import local_server_app


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(MODEL)


@pytest.fixture()
def server(engine):
    app = create_app(Settings(model=MODEL, max_tokens_limit=4000), engine)
    with local_server_app(app) as url:
        yield url, app


def test_disconnect_mid_stream_cancels_the_work(server):
    url, app = server
    body = {"model": MODEL, "messages": user("Describe it.", data_url(make_image(0))), "max_tokens": 4000, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert all(line.startswith("data:") or line == "" for line in got)
        # the connection is closed: the row must stop long before 4000 tokens
        deadline = time.time() + 20
        while app.state.scheduler.cancelled == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert app.state.scheduler.cancelled == 1
        assert app.state.scheduler.depth == 0
        ok = client.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
        assert ok.status_code == 200


class FailingEngine:
    """Raises (like an out-of-memory error) when a poisoned prompt is admitted; otherwise the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def admit(self, requests):
        if any(r.prompt == "poison" for r in requests):
            raise RuntimeError("CUDA out of memory (injected)")
        return self.engine.admit(requests)


def test_a_failing_request_fails_alone(engine):
    scheduler = Scheduler(FailingEngine(engine), max_batch_size=4, batch_wait_s=0.2)

    async def main():
        loop = asyncio.get_running_loop()
        prompts = ["Is there a dog?", "poison", "Describe it."]
        jobs = [Job(GenerationRequest(prompt=p, images=[make_image(0)], max_new_tokens=4), loop, loop.create_future()) for p in prompts]
        for job in jobs:
            scheduler.submit(job)
        return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)

    scheduler.start()
    try:
        results = asyncio.run(main())
    finally:
        scheduler.stop()
    assert isinstance(results[1], RuntimeError) and "out of memory" in str(results[1])
    assert [len(r.token_ids) for r in (results[0], results[2])] == [4, 4]


def test_eval_against_a_running_server_equals_in_process(server, tmp_path, capsys):
    import json

    from seeright.cli import main
    from seeright.eval import pope

    url, _ = server
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(sorted({q.image for q in pope.builtin_questions("random")[:6]})):
        make_image(i).save(images / name)
    common = ["eval", "pope", "--model", "tiny-random/llava", "--images", str(images), "--split", "random", "--limit", "6", "--max-new-tokens", "4",
              "--intervention", "vhr"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main([*common, "--out", str(tmp_path / "remote"), "--endpoint", url]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote == local
    assert (tmp_path / "remote/vhr/pope.jsonl").read_text() == (tmp_path / "local/vhr/pope.jsonl").read_text()
