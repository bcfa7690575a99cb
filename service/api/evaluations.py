"""``/v1/evaluations``: POPE / CHAIR jobs run in the background through the same scheduler as chat requests.

A job's id is a hash of what it runs (model, benchmark, splits, limit, prompt, interventions, decoding),
and its results file lives under ``settings.eval_dir/<id>/``. Posting the same job again after a
restart resumes it from that file; predictions already on disk are neither lost nor repeated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from eval import chair, pope, runner
from service.engine import GenerationRequest, RequestError
from service.scheduler import Job, QueueFull, Scheduler


class EvaluationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    benchmark: Literal["pope", "chair"]
    images: str = Field(".", description="Image folder, relative to the server's allowed image folder.")
    split: list[Literal["random", "popular", "adversarial"]] = Field(default_factory=lambda: list(pope.SPLITS))
    limit: int | None = Field(None, ge=1)
    prompt: Literal["plain", "llava", "vcd", "vaf"] = "plain"
    interventions: dict[str, dict[str, Any]] = Field(default_factory=dict)
    max_new_tokens: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1, le=64)


class SchedulerGenerator:
    """The runner's generator on top of the scheduler: evaluation requests batch with live traffic."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def generate(self, prompts: Sequence[str], images: Sequence[Image.Image], interventions: dict, max_new_tokens: int) -> list[str]:
        async def run() -> list[str]:
            loop = asyncio.get_running_loop()
            jobs = []
            for prompt, image in zip(prompts, images):
                req = GenerationRequest(prompt=prompt, images=[image], interventions=interventions, max_new_tokens=max_new_tokens)
                job = Job(req, loop, loop.create_future())
                while True:
                    try:
                        self.scheduler.submit(job)
                        break
                    except QueueFull:  # live traffic first: wait for room
                        await asyncio.sleep(0.1)
                jobs.append(job)
            return [out.text for out in await asyncio.gather(*(j.future for j in jobs))]

        return asyncio.run(run())


@dataclass
class EvaluationJob:
    id: str
    request: EvaluationRequest
    spec: runner.BenchmarkSpec
    out_dir: Path
    status: str = "queued"
    done: int = 0
    total: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    gt: Any = None

    @property
    def results(self) -> Path:
        return self.out_dir / f"{self.request.benchmark}.jsonl"

    def view(self) -> dict[str, Any]:
        records = runner.read_done(self.results, repair=False)
        if self.spec.benchmark == "chair" and records and self.gt is None:
            self.gt = chair.load_ground_truth(self.spec.gt)
        return {
            "id": self.id, "object": "evaluation", "status": self.status, "benchmark": self.request.benchmark,
            "progress": {"done": len(records), "total": self.total},
            "metrics": runner.score_records(self.spec, records, self.gt), "error": self.error,
            "request": self.request.model_dump(), "results_file": str(self.results),
        }


def _job_id(model: str, req: EvaluationRequest) -> str:
    key = json.dumps({"model": model, **req.model_dump()}, sort_keys=True)
    return "eval-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _run(job: EvaluationJob, scheduler: Scheduler) -> None:
    job.status = "running"
    try:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        metrics = runner.run_benchmark(
            job.spec, SchedulerGenerator(scheduler), job.results, job.request.interventions, progress=False, on_batch=progress
        )
        (job.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        job.status = "completed"
    except Exception as exc:  # reported through GET; the results so far stay on disk
        job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"


router = APIRouter()


@router.post("/v1/evaluations", status_code=202)
async def create_evaluation(body: EvaluationRequest, request: Request) -> dict[str, Any]:
    state = request.app.state
    settings, scheduler = state.settings, state.scheduler
    if settings.allowed_image_dir is None:
        raise RequestError("images", "this server has no allowed image folder (--allowed-image-dir)")
    root = settings.allowed_image_dir.resolve()
    images = (root / body.images).resolve()
    if not images.is_relative_to(root) or not images.is_dir():
        raise RequestError("images", "not a folder inside the allowed image folder")
    if body.max_new_tokens is not None and body.max_new_tokens > settings.max_tokens_limit:
        raise RequestError("max_new_tokens", f"exceeds this server's limit of {settings.max_tokens_limit}")
    scheduler.engine.validate(GenerationRequest(prompt="check", images=[Image.new("RGB", (8, 8))], interventions=body.interventions))
    job_id = _job_id(settings.name, body)
    jobs: dict[str, EvaluationJob] = state.evaluations
    existing = jobs.get(job_id)
    if existing is not None and existing.status in ("queued", "running", "completed"):
        return existing.view()
    spec = runner.BenchmarkSpec(
        benchmark=body.benchmark, images=images, splits=tuple(body.split), limit=body.limit, prompt=body.prompt,
        max_new_tokens=body.max_new_tokens, batch_size=body.batch_size,
    )
    job = EvaluationJob(job_id, body, spec, settings.eval_dir / job_id, total=len(runner.benchmark_items(spec)))
    job.out_dir.mkdir(parents=True, exist_ok=True)
    (job.out_dir / "request.json").write_text(body.model_dump_json(indent=2))
    jobs[job_id] = job
    threading.Thread(target=_run, args=(job, scheduler), name=job_id, daemon=True).start()
    return job.view()


@router.get("/v1/evaluations/{job_id}")
async def get_evaluation(job_id: str, request: Request) -> dict[str, Any]:
    job = request.app.state.evaluations.get(job_id)
    if job is None:
        raise HTTPException(404, f"evaluation {job_id!r} not found (post it again to resume a job from disk)")
    return job.view()


@router.get("/v1/evaluations")
async def list_evaluations(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [j.view() for j in request.app.state.evaluations.values()]}
