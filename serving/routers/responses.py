"""The one error body: ``{"error": message}`` with the error's status (shared by all paths)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from serving.errors import QueueFull, SlimServeError, Unauthorized


def error_headers(exc: SlimServeError) -> dict[str, str] | None:
    """Extra headers for an error (``Retry-After`` when the queue is full, the Bearer
    challenge on a 401)."""
    if isinstance(exc, QueueFull):
        return {"Retry-After": "1"}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": 'Bearer realm="slimserve"'}
    return None


def error_response(exc: SlimServeError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.message}, status_code=exc.status_code, headers=error_headers(exc)
    )
