"""Evaluation jobs: POPE / CHAIR runs in the background through the same engine client as chat requests.

A job's id is a hash of who runs what (owner, model, benchmark, splits, limit, prompt, interventions, decoding),
and its results file lives under ``settings.eval_dir/<id>/``. Posting the same job again after a
restart resumes it from that file; predictions already on disk are neither lost nor repeated.

A job belongs to the key that posted it: a key sees and cancels its own jobs, an admin key every job. At most
``max_running_evaluations`` jobs run at once (a 429 with ``Retry-After`` beyond). ``DELETE`` stops a job between two
batches, so its results file holds whole batches only and a later POST resumes it. Everything that reads files or
scores runs off the event loop; metrics are computed once per new result, and CHAIR's ground truth is loaded once
for all jobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import HTTPException
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from seeright.eval import chair, pope, report, runner
from seeright.service.api.deps import Caller
from seeright.service.api.model_ids import split_model
from seeright.service.requests import GenerationOutput, GenerationRequest, RequestError
from seeright.service.settings import Settings


class GenerationClient(Protocol):
    """What evaluation jobs need: the engine client of this process, or a pool of replicas (``seeright.service.scale_out``)."""

    async def generate(self, request: GenerationRequest, wait_for_room: bool = False) -> GenerationOutput: ...

    async def check(self, request: GenerationRequest) -> None: ...

    async def check_interventions(self, interventions: dict[str, dict[str, Any]]) -> None: ...

    @property
    def adapters(self) -> Collection[str]: ...


class EvaluationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    benchmark: Literal["pope", "chair"]
    model: str | None = Field(
        None, max_length=400,
        description="The served model or one of its LoRA adapters, presets allowed (``NAME+vcd``); default: the base model.",
    )
    images: str = Field(".", max_length=4096, description="Image folder, relative to the server's allowed image folder.")
    split: list[Literal["random", "popular", "adversarial"]] = Field(
        default_factory=lambda: list(pope.SPLITS), min_length=1, max_length=len(pope.SPLITS)
    )
    limit: int | None = Field(None, ge=1)
    prompt: Literal["plain", "llava", "vcd", "vaf"] = "plain"
    interventions: dict[str, dict[str, Any]] = Field(default_factory=dict)
    max_new_tokens: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1, le=64)

    @field_validator("split")
    @classmethod
    def _each_split_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each split at most once")
        return value

    @field_validator("images")
    @classmethod
    def _a_path(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("not a valid path (NUL byte)")
        return value


class JobCancelled(Exception):
    """A job stopped by ``DELETE`` between two batches."""


class ClientGenerator:
    """The runner's (synchronous) generator on the engine client, called from a job's worker thread: its
    requests go through the same client and scheduler as chat requests and wait for room behind them. Once
    ``cancelled`` is set, the batch in flight is dropped and no new batch starts."""

    def __init__(
        self, client: GenerationClient, loop: asyncio.AbstractEventLoop, cancelled: threading.Event, adapter: str | None = None,
    ) -> None:
        self.client, self.loop, self.cancelled, self.adapter = client, loop, cancelled, adapter

    def generate(self, prompts: Sequence[str], images: Sequence[Image.Image], interventions: dict, max_new_tokens: int) -> list[str]:
        if self.cancelled.is_set():
            raise JobCancelled

        async def run() -> list[str]:
            requests = [
                GenerationRequest(prompt=p, images=[im], interventions=interventions, max_new_tokens=max_new_tokens,
                                  adapter=self.adapter)
                for p, im in zip(prompts, images)
            ]
            outs = await asyncio.gather(*(self.client.generate(r, wait_for_room=True) for r in requests))
            return [out.text for out in outs]

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        while True:
            try:
                texts = future.result(timeout=0.2)
                break
            except TimeoutError:
                if self.cancelled.is_set():
                    future.cancel()  # the batch's requests leave the scheduler; nothing of it is written
                    raise JobCancelled from None
        if self.cancelled.is_set():
            raise JobCancelled
        return texts


@dataclass
class EvaluationJob:
    id: str
    owner: str
    request: EvaluationRequest
    spec: runner.BenchmarkSpec
    out_dir: Path
    status: str = "queued"
    done: int = 0
    total: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    gt: Any = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    _scored: tuple[int, dict[str, Any]] = (-1, {})  # (results file size, its metrics)

    @property
    def results(self) -> Path:
        return self.out_dir / f"{self.request.benchmark}.jsonl"

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running", "cancelling")

    def visible_to(self, caller: Caller) -> bool:
        """An admin sees every job; any other key its own."""
        return caller.admin or self.owner == caller.id

    def view(self) -> dict[str, Any]:
        """The job as the API shows it; reads the results file only when it grew (call off the event loop)."""
        size = self.results.stat().st_size if self.results.is_file() else 0
        if size != self._scored[0]:
            records = runner.read_done(self.results, repair=False)
            try:
                metrics = runner.score_records(self.spec, records, self.gt)
            except (KeyError, ValueError) as exc:  # one job's bad results never break the listing of every job
                metrics = {"error": f"cannot score the results so far ({type(exc).__name__}: {exc})"}
            self._scored = (size, {"done": len(records), "metrics": metrics})
        scored = self._scored[1]
        return {
            "id": self.id, "object": "evaluation", "status": self.status, "benchmark": self.request.benchmark,
            "progress": {"done": scored.get("done", 0), "total": self.total},
            "metrics": scored.get("metrics", {}), "error": self.error,
            "request": self.request.model_dump(), "results_file": str(self.results),
        }


def _job_id(owner: str, model: str, req: EvaluationRequest) -> str:
    key = json.dumps({"owner": owner, "model": model, **req.model_dump()}, sort_keys=True)
    return "eval-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _run(job: EvaluationJob, generator: ClientGenerator) -> None:
    job.status = "running"
    try:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        metrics = runner.run_benchmark(job.spec, generator, job.results, job.request.interventions, progress=False,
                                       on_batch=progress, confine=job.spec.images, gt=job.gt)
        label = "+".join(sorted(job.request.interventions)) or "baseline"
        report.write_report(job.out_dir, job.request.benchmark, {label: metrics})  # metrics.json, report.md, plot.png
        job.status = "completed"
    except JobCancelled:
        job.status = "cancelled"
    except Exception as exc:  # reported through GET; the results so far stay on disk
        job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"


def _image_folder(settings: Settings, relative: str) -> Path:
    if settings.allowed_image_dir is None:
        raise RequestError("images", "this server has no allowed image folder (--allowed-image-dir)")
    root = settings.allowed_image_dir.resolve()
    try:
        images = (root / relative).resolve()
        inside = images.is_relative_to(root) and images.is_dir()
    except (OSError, ValueError) as exc:
        raise RequestError("images", f"not a readable path ({type(exc).__name__})") from exc
    if not inside:
        raise RequestError("images", "not a folder inside the allowed image folder")
    return images


def _first_request(
    body: EvaluationRequest, spec: runner.BenchmarkSpec, items: list[runner.EvalItem], adapter: str | None,
) -> GenerationRequest:
    """The first item as a request, to check as a chat request is checked; images must stay in their folder."""
    if not items:
        raise RequestError("images", "the benchmark has no items for this folder and split")
    first = items[0]
    if not first.image.is_file():
        raise RequestError("images", f"{first.image.name} (the first item's image) is not in the image folder")
    if not first.image.resolve().is_relative_to(spec.images):
        raise RequestError("images", f"{first.image.name} links outside the image folder")
    with Image.open(first.image) as image:
        return GenerationRequest(prompt=first.prompt, images=[image.convert("RGB")], interventions=body.interventions,
                                 max_new_tokens=spec.new_tokens, adapter=adapter)


class EvaluationJobs:
    """The app's evaluation jobs: started once per content hash, each in a worker thread of its own."""

    def __init__(self, settings: Settings, client: GenerationClient, engines: int = 1) -> None:
        self.settings, self.client = settings, client
        self.engines = engines  # items in flight per batch: batch_size per engine (replicas share a job's batches)
        self.jobs: dict[str, EvaluationJob] = {}
        self._ground_truth: dict[Path | None, Any] = {}  # CHAIR annotations, loaded once for every job

    def ground_truth(self, path: Path | None) -> Any:
        if path not in self._ground_truth:
            self._ground_truth[path] = chair.load_ground_truth(path)
        return self._ground_truth[path]

    def _prepare(self, body: EvaluationRequest, adapter: str | None) -> tuple[runner.BenchmarkSpec, list[runner.EvalItem], Any, GenerationRequest]:
        """Files and checks (a thread's work): the folder, the items, CHAIR's ground truth, the first request."""
        settings = self.settings
        images = _image_folder(settings, body.images)
        if body.max_new_tokens is not None and body.max_new_tokens > settings.max_tokens_limit:
            raise RequestError("max_new_tokens", f"exceeds this server's limit of {settings.max_tokens_limit}")
        spec = runner.BenchmarkSpec(
            benchmark=body.benchmark, images=images, splits=tuple(body.split), limit=body.limit, prompt=body.prompt,
            max_new_tokens=body.max_new_tokens, batch_size=body.batch_size * self.engines,
        )
        items = runner.benchmark_items(spec)
        gt = None
        if spec.benchmark == "chair":
            gt = self.ground_truth(spec.gt)
            unknown = [it.image.name for it in items if it.record["image_id"] not in gt]
            if unknown:
                raise RequestError("images", f"{unknown[0]} (and {len(unknown) - 1} more) have no CHAIR ground truth: "
                                   "COCO val2014 file names (COCO_val2014_000000123456.jpg) of annotated images only")
        return spec, items, gt, _first_request(body, spec, items, adapter)

    async def create(self, body: EvaluationRequest, owner: str = "anonymous") -> EvaluationJob:
        settings = self.settings
        adapter, presets = split_model(body.model or settings.name, settings.name, self.client.adapters)
        if presets:
            body = body.model_copy(update={"interventions": {name: {} for name in presets} | body.interventions})
        job_id = _job_id(owner, settings.name, body)
        existing = self.jobs.get(job_id)
        if existing is not None and existing.status in ("queued", "running", "completed"):
            return existing
        if sum(job.active for job in self.jobs.values()) >= settings.max_running_evaluations:
            raise HTTPException(429, f"{settings.max_running_evaluations} evaluation jobs are running; retry later",
                                headers={"Retry-After": str(max(settings.retry_after_s, 30))})
        job = EvaluationJob(job_id, owner, body, None, settings.eval_dir / job_id)  # type: ignore[arg-type]
        self.jobs[job_id] = job  # taken before the first await: a second identical POST gets this job, not a twin
        try:
            await self.client.check_interventions(body.interventions)
            job.spec, items, job.gt, first = await run_in_threadpool(self._prepare, body, adapter)
            await self.client.check(first)
        except BaseException:
            if existing is not None:
                self.jobs[job_id] = existing
            else:
                del self.jobs[job_id]
            raise
        job.total = len(items)
        job.out_dir.mkdir(parents=True, exist_ok=True)
        (job.out_dir / "request.json").write_text(body.model_dump_json(indent=2))
        generator = ClientGenerator(self.client, asyncio.get_running_loop(), job.cancelled, adapter)
        threading.Thread(target=_run, args=(job, generator), name=job_id, daemon=True).start()
        return job

    def visible(self, caller: Caller) -> list[EvaluationJob]:
        """The jobs ``caller`` may see: its own, or every job for an admin."""
        return [job for job in self.jobs.values() if job.visible_to(caller)]

    def get(self, job_id: str, caller: Caller) -> EvaluationJob:
        job = self.jobs.get(job_id)
        if job is None or not job.visible_to(caller):
            raise HTTPException(404, f"evaluation {job_id!r} not found (post it again to resume a job from disk)")
        return job

    def cancel(self, job_id: str, caller: Caller) -> EvaluationJob:
        """Stop a job between two batches; its results file keeps the whole batches written so far."""
        job = self.get(job_id, caller)
        if job.active:
            job.cancelled.set()
            job.status = "cancelling" if job.status == "running" else "cancelled"
        return job
