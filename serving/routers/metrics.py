"""``GET /metrics``: Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from serving.routers.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(metrics: MetricsDep) -> Response:
    """Every server and model metric."""
    body, content_type = metrics.render()
    return Response(content=body, media_type=content_type)
