"""The one error body: ``{"error": message}`` with the error's status (shared by all paths)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from serving.errors import QueueFull, SlimServeError


def error_headers(exc: SlimServeError) -> dict[str, str] | None:
    """Extra headers for an error (``Retry-After`` when the queue is full)."""
    return {"Retry-After": "1"} if isinstance(exc, QueueFull) else None


def error_response(exc: SlimServeError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.message}, status_code=exc.status_code, headers=error_headers(exc)
    )
