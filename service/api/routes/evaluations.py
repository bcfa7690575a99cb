"""``POST /v1/evaluations``, ``GET /v1/evaluations[/{id}[/plot.png]]``: background POPE / CHAIR jobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse

from seeright.service.api.deps import AUTHORIZED
from seeright.service.api.serving_evaluations import EvaluationJobs, EvaluationRequest


def get_jobs(request: Request) -> EvaluationJobs:
    return request.app.state.evaluations


JobsDep = Annotated[EvaluationJobs, Depends(get_jobs)]
router = APIRouter(dependencies=AUTHORIZED)


@router.post("/v1/evaluations", status_code=202)
async def create_evaluation(body: EvaluationRequest, jobs: JobsDep) -> dict[str, Any]:
    return (await jobs.create(body)).view()


@router.get("/v1/evaluations/{job_id}")
async def get_evaluation(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    return jobs.get(job_id).view()


@router.get("/v1/evaluations/{job_id}/plot.png")
async def get_evaluation_plot(job_id: str, jobs: JobsDep) -> FileResponse:
    """The finished job's report plot (``seeright.eval.report``; needs matplotlib, the ``[eval]`` extra)."""
    plot = jobs.get(job_id).out_dir / "plot.png"
    if not plot.is_file():
        raise HTTPException(404, f"evaluation {job_id!r} has no plot (not finished, or matplotlib is not installed)")
    return FileResponse(plot)


@router.get("/v1/evaluations")
async def list_evaluations(jobs: JobsDep) -> dict[str, Any]:
    return {"object": "list", "data": [job.view() for job in jobs.jobs.values()]}
