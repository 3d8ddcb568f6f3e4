"""One error hierarchy for the whole server: each error carries its HTTP status.

Errors pickle (they cross the job-worker process boundary): every subclass keeps its
message as the single positional argument.
"""

from __future__ import annotations


class SlimServeError(Exception):
    """Base class: ``status_code`` is the HTTP status the error maps to."""

    status_code: int = 500
    reason: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(SlimServeError):
    """The client sent something malformed or inconsistent (400)."""

    status_code = 400
    reason = "invalid_input"


class Unauthorized(SlimServeError):
    status_code = 401
    reason = "unauthorized"


class Forbidden(SlimServeError):
    status_code = 403
    reason = "forbidden"


class ModelNotFound(SlimServeError):
    """Unknown model or version (404)."""

    status_code = 404
    reason = "not_found"


class NotFound(SlimServeError):
    status_code = 404
    reason = "not_found"


class Conflict(SlimServeError):
    status_code = 409
    reason = "conflict"


class PayloadTooLarge(SlimServeError):
    """A configured size limit was exceeded (413); the message names the limit."""

    status_code = 413
    reason = "too_large"


class ModelNotReady(SlimServeError):
    status_code = 503
    reason = "not_ready"


class QueueFull(SlimServeError):
    status_code = 503
    reason = "queue_full"


class ServerShuttingDown(SlimServeError):
    status_code = 503
    reason = "shutting_down"


class QueueTimeout(SlimServeError):
    status_code = 504
    reason = "timeout"


class RepositoryError(SlimServeError):
    """A model folder or config in the repository is broken (reported, not raised at clients)."""

    status_code = 400
    reason = "repository"


class EngineError(SlimServeError):
    """The runtime failed while executing a request (500, the model stays up)."""

    status_code = 500
    reason = "engine"
