"""Server metadata and health: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from serving.routers.deps import ModelsDep

router = APIRouter(tags=["health"])

EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics", "schedule_policy"]


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slimserve")
    except PackageNotFoundError:
        return "0.0.0"


@router.get("/v2")
async def server_metadata() -> JSONResponse:
    """Server name, version and protocol extensions."""
    return JSONResponse(
        {"name": "slimserve", "version": server_version(), "extensions": EXTENSIONS}
    )


@router.get("/v2/health/live")
async def live() -> Response:
    """200 while the process serves HTTP."""
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(models: ModelsDep) -> Response:
    """200 once the initial model load has finished and until shutdown starts, else 503."""
    if models.ready:
        return Response(status_code=200)
    state = "shutting down" if models.closing else "loading models"
    return JSONResponse({"error": f"server is not ready: {state}"}, status_code=503)
