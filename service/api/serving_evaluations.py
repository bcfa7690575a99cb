"""Evaluation jobs: POPE / CHAIR runs in the background through the same engine client as chat requests.

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
from typing import Any, Literal, Protocol

from fastapi import HTTPException
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from seeright.eval import chair, pope, report, runner
from seeright.service.requests import GenerationOutput, GenerationRequest, RequestError
from seeright.service.settings import Settings


class GenerationClient(Protocol):
    """What evaluation jobs need: the engine client of this process, or a pool of replicas (``seeright.service.scale_out``)."""

    async def generate(self, request: GenerationRequest, wait_for_room: bool = False) -> GenerationOutput: ...

    async def check(self, request: GenerationRequest) -> None: ...

    async def check_interventions(self, interventions: dict[str, dict[str, Any]]) -> None: ...


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


class ClientGenerator:
    """The runner's (synchronous) generator on the engine client, called from a job's worker thread: its
    requests go through the same client and scheduler as chat requests and wait for room behind them."""

    def __init__(self, client: GenerationClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.loop = client, loop

    def generate(self, prompts: Sequence[str], images: Sequence[Image.Image], interventions: dict, max_new_tokens: int) -> list[str]:
        async def run() -> list[str]:
            requests = [
                GenerationRequest(prompt=p, images=[im], interventions=interventions, max_new_tokens=max_new_tokens)
                for p, im in zip(prompts, images)
            ]
            outs = await asyncio.gather(*(self.client.generate(r, wait_for_room=True) for r in requests))
            return [out.text for out in outs]

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()


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


def _run(job: EvaluationJob, generator: ClientGenerator) -> None:
    job.status = "running"
    try:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        metrics = runner.run_benchmark(
            job.spec, generator, job.results, job.request.interventions, progress=False, on_batch=progress
        )
        label = "+".join(sorted(job.request.interventions)) or "baseline"
        report.write_report(job.out_dir, job.request.benchmark, {label: metrics})  # metrics.json, report.md, plot.png
        job.status = "completed"
    except Exception as exc:  # reported through GET; the results so far stay on disk
        job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"


def _image_folder(settings: Settings, relative: str) -> Path:
    if settings.allowed_image_dir is None:
        raise RequestError("images", "this server has no allowed image folder (--allowed-image-dir)")
    root = settings.allowed_image_dir.resolve()
    images = (root / relative).resolve()
    if not images.is_relative_to(root) or not images.is_dir():
        raise RequestError("images", "not a folder inside the allowed image folder")
    return images


async def _validate(client: GenerationClient, body: EvaluationRequest, items: list[runner.EvalItem], new_tokens: int) -> None:
    """Parameters first, then the first item as a request, through the same checks as a chat request."""
    await client.check_interventions(body.interventions)
    if not items:
        raise RequestError("images", "the benchmark has no items for this folder and split")
    first = items[0]
    if not first.image.is_file():
        raise RequestError("images", f"{first.image.name} (the first item's image) is not in the image folder")
    with Image.open(first.image) as image:
        request = GenerationRequest(prompt=first.prompt, images=[image.convert("RGB")], interventions=body.interventions,
                                    max_new_tokens=new_tokens)
    await client.check(request)


class EvaluationJobs:
    """The app's evaluation jobs: started once per content hash, each in a worker thread of its own."""

    def __init__(self, settings: Settings, client: GenerationClient, engines: int = 1) -> None:
        self.settings, self.client = settings, client
        self.engines = engines  # items in flight per batch: batch_size per engine (replicas share a job's batches)
        self.jobs: dict[str, EvaluationJob] = {}

    async def create(self, body: EvaluationRequest) -> EvaluationJob:
        settings = self.settings
        images = _image_folder(settings, body.images)
        if body.max_new_tokens is not None and body.max_new_tokens > settings.max_tokens_limit:
            raise RequestError("max_new_tokens", f"exceeds this server's limit of {settings.max_tokens_limit}")
        spec = runner.BenchmarkSpec(
            benchmark=body.benchmark, images=images, splits=tuple(body.split), limit=body.limit, prompt=body.prompt,
            max_new_tokens=body.max_new_tokens, batch_size=body.batch_size * self.engines,
        )
        items = runner.benchmark_items(spec)
        await _validate(self.client, body, items, spec.new_tokens)
        job_id = _job_id(settings.name, body)
        existing = self.jobs.get(job_id)
        if existing is not None and existing.status in ("queued", "running", "completed"):
            return existing
        job = EvaluationJob(job_id, body, spec, settings.eval_dir / job_id, total=len(items))
        job.out_dir.mkdir(parents=True, exist_ok=True)
        (job.out_dir / "request.json").write_text(body.model_dump_json(indent=2))
        self.jobs[job_id] = job
        generator = ClientGenerator(self.client, asyncio.get_running_loop())
        threading.Thread(target=_run, args=(job, generator), name=job_id, daemon=True).start()
        return job

    def get(self, job_id: str) -> EvaluationJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"evaluation {job_id!r} not found (post it again to resume a job from disk)")
        return job
