"""Upload-and-optimize endpoints.

``POST /v2/optimize`` takes a multipart upload (``model`` file, ``request`` JSON, optional
``calibration`` file) and answers 202 with the job's id and URL; the job resource lives at
``/v2/optimize/jobs[/{id}]`` (``GET`` status, progress, log tail, report; ``DELETE``
cancels, ``?purge=true`` also deletes the record and files). The paths sit under ``/v2``
beside the KServe v2 routes without clashing with them (KServe reserves ``/v2/models``,
``/v2/repository`` and ``/v2/health``). Example::

    curl -F model=@bert.tar.gz \
         -F 'request={"name": "bert", "min_cosine": 0.99, "time_budget_s": 600}' \
         -F calibration=@texts.txt http://localhost:8000/v2/optimize
    curl http://localhost:8000/v2/optimize/jobs/<id>
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, status

from serving.errors import ServerShuttingDown
from serving.jobs import JobManager
from serving.jobs.records import JobRecord
from serving.jobs.request import OptimizeRequestBody

router = APIRouter(prefix="/v2/optimize", tags=["optimize"])

UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model", "request"],
                    "properties": {
                        "model": {
                            "type": "string",
                            "format": "binary",
                            "description": ".onnx, .pt2, or .zip/.tar.gz of a Hugging Face "
                            "folder (config.json + model.safetensors) or an ONNX model with "
                            "external data",
                        },
                        "request": {
                            **OptimizeRequestBody.model_json_schema(),
                            "description": "the optimization request, a JSON object",
                        },
                        "calibration": {
                            "type": "string",
                            "format": "binary",
                            "description": ".npz of input arrays, or text, one example a line",
                        },
                    },
                },
                "encoding": {"request": {"contentType": "application/json"}},
            }
        },
    }
}


def get_jobs(request: Request) -> JobManager:
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise ServerShuttingDown("the optimization job manager is not running")
    return jobs


JobsDep = Annotated[JobManager, Depends(get_jobs)]


def job_url(job_id: str) -> str:
    return f"{router.prefix}/jobs/{job_id}"


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats (which JSON cannot carry) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def job_view(record: JobRecord, *, full: bool = True) -> dict[str, Any]:
    data = json_safe(record.to_dict() if full else record.summary())
    data["url"] = job_url(record.id)
    return data


@router.post("", status_code=status.HTTP_202_ACCEPTED, openapi_extra=UPLOAD_DOC)
async def upload(request: Request, response: Response, jobs: JobsDep) -> dict[str, Any]:
    """Upload a model and start an optimization job; 202 with the job id and URL."""
    length = request.headers.get("content-length")
    record = await jobs.submit_upload(
        request.stream(),
        request.headers.get("content-type"),
        int(length) if length and length.isdigit() else None,
        expects_continue=request.headers.get("expect", "").lower() == "100-continue",
    )
    response.headers["Location"] = job_url(record.id)
    return {
        "id": record.id,
        "state": record.state,
        "model": record.model,
        "url": job_url(record.id),
    }


@router.get("/jobs")
async def list_jobs(jobs: JobsDep) -> dict[str, Any]:
    """Every job, oldest first (without reports and log tails)."""
    return {"jobs": [job_view(r, full=False) for r in jobs.list()]}


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """State, stage, progress, current candidate, log tail, error, version, report."""
    return job_view(jobs.get(job_id))


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, jobs: JobsDep, purge: bool = False) -> dict[str, Any]:
    """Cancel a queued or running job (409 when it has already finished).

    ``?purge=true`` also deletes the job's record, upload and logs (any state).
    """
    if purge:
        return job_view(await jobs.purge(job_id))
    return job_view(await jobs.cancel(job_id))
