"""``POST /v1/evaluations``, ``GET /v1/evaluations[/{id}[/plot.png]]``: background POPE / CHAIR jobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from seeright.service.api.deps import AUTHORIZED, CallerDep
from seeright.service.api.serving_evaluations import EvaluationJobs, EvaluationRequest


def get_jobs(request: Request) -> EvaluationJobs:
    return request.app.state.evaluations


JobsDep = Annotated[EvaluationJobs, Depends(get_jobs)]
router = APIRouter(dependencies=AUTHORIZED)


@router.post("/v1/evaluations", status_code=202)
async def create_evaluation(body: EvaluationRequest, jobs: JobsDep, caller: CallerDep) -> dict[str, Any]:
    """Start (or resume) a job owned by the caller's key; 429 with ``Retry-After`` when too many run."""
    return await run_in_threadpool((await jobs.create(body, caller.id)).view)


@router.get("/v1/evaluations/{job_id}")
async def get_evaluation(job_id: str, jobs: JobsDep, caller: CallerDep) -> dict[str, Any]:
    return await run_in_threadpool(jobs.get(job_id, caller).view)


@router.delete("/v1/evaluations/{job_id}")
async def cancel_evaluation(job_id: str, jobs: JobsDep, caller: CallerDep) -> dict[str, Any]:
    """Stop the job between two batches (its results file keeps whole batches; posting it again resumes it)."""
    return await run_in_threadpool(jobs.cancel(job_id, caller).view)


@router.get("/v1/evaluations/{job_id}/plot.png")
async def get_evaluation_plot(job_id: str, jobs: JobsDep, caller: CallerDep) -> FileResponse:
    """The finished job's report plot (``seeright.eval.report``; needs matplotlib, the ``[eval]`` extra)."""
    plot = jobs.get(job_id, caller).out_dir / "plot.png"
    if not plot.is_file():
        raise HTTPException(404, f"evaluation {job_id!r} has no plot (not finished, or matplotlib is not installed)")
    return FileResponse(plot)


@router.get("/v1/evaluations")
async def list_evaluations(jobs: JobsDep, caller: CallerDep) -> dict[str, Any]:
    """The caller's jobs (an admin key: every job)."""
    views = await run_in_threadpool(lambda: [job.view() for job in jobs.visible(caller)])
    return {"object": "list", "data": views}
