"""POST /v1/evaluations: background jobs through the scheduler, progress, and resume after a restart."""

from __future__ import annotations

import time

from conftest import make_image
from fastapi.testclient import TestClient

from seeright.eval import pope, runner
from seeright.service.api.app import create_app
from seeright.service.engine import Engine, EngineGenerator
from seeright.service.settings import Settings

MODEL = "tiny-random/llava"


def _images(root):
    for i, name in enumerate(sorted({q.image for q in pope.builtin_questions("random")[:8]})):
        make_image(i).save(root / name)


def _wait(client, job_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = client.get(f"/v1/evaluations/{job_id}").json()
        if view["status"] in ("completed", "failed"):
            return view
        time.sleep(0.05)
    raise AssertionError("evaluation did not finish")


def test_evaluation_job_runs_resumes_and_matches_in_process(tmp_path):
    images, eval_dir = tmp_path / "images", tmp_path / "evals"
    images.mkdir()
    _images(images)
    engine = Engine.from_pretrained(MODEL)
    settings = Settings(model=MODEL, allowed_image_dir=images, eval_dir=eval_dir)
    body = {"benchmark": "pope", "split": ["random"], "limit": 8, "prompt": "llava", "interventions": {"gift": {}},
            "max_new_tokens": 4, "batch_size": 3}
    with TestClient(create_app(settings, engine)) as client:
        created = client.post("/v1/evaluations", json=body)
        assert created.status_code == 202
        job_id = created.json()["id"]
        view = _wait(client, job_id)
        assert view["status"] == "completed" and view["progress"] == {"done": 8, "total": 8}
        assert view["metrics"]["splits"]["random"]["n"] == 8
        assert client.post("/v1/evaluations", json=body).json()["id"] == job_id  # same job, not rerun
        assert client.get("/v1/evaluations").json()["data"][0]["id"] == job_id
    results = eval_dir / job_id / "pope.jsonl"
    full = results.read_bytes()

    spec = runner.BenchmarkSpec("pope", images, ("random",), 8, "llava", max_new_tokens=4, batch_size=3)
    in_process = tmp_path / "in_process.jsonl"
    metrics = runner.run_benchmark(spec, EngineGenerator(engine), in_process, {"gift": {}}, progress=False)
    assert in_process.read_bytes() == full and metrics == view["metrics"]

    # a restart after a kill mid-write: 3 complete lines and a torn one stay on disk
    lines = full.splitlines(keepends=True)
    results.write_bytes(b"".join(lines[:3]) + lines[3][:10])
    with TestClient(create_app(settings, engine)) as client:
        assert client.get(f"/v1/evaluations/{job_id}").status_code == 404  # not known to the new process
        assert client.post("/v1/evaluations", json=body).json()["id"] == job_id
        assert _wait(client, job_id)["status"] == "completed"
    assert results.read_bytes() == full


def test_evaluation_input_errors(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    engine = Engine.from_pretrained(MODEL)
    with TestClient(create_app(Settings(model=MODEL, allowed_image_dir=images, eval_dir=tmp_path / "e"), engine)) as c:
        for patch, param in (({"images": "../.."}, "images"), ({"benchmark": "mme"}, "benchmark"),
                             ({"interventions": {"var": {"rho": 9}}}, "interventions.var.rho"),
                             ({"limit": 0}, "limit")):
            r = c.post("/v1/evaluations", json={"benchmark": "pope", **patch})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert c.get("/v1/evaluations/eval-nope").status_code == 404
