"""``build_app(settings)``: wires routers, exception handlers and the services' lifetime.

Extending: other parts of the server add a router to ``ROUTERS`` (or pass ``routers=``) and
a lifespan part to ``LIFESPAN_PARTS`` (an async context manager factory taking the app);
parts are entered in order at start and left in reverse order at shutdown.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from serving.auth import ApiKeys, Scope, require
from serving.errors import SlimServeError
from serving.routers.responses import error_response
from serving.settings import Settings

log = logging.getLogger(__name__)

LifespanPart = Callable[[FastAPI], contextlib.AbstractAsyncContextManager[Any]]


@contextlib.asynccontextmanager
async def serving_core(app: FastAPI) -> AsyncIterator[None]:
    """Repository, metrics and models: loaded at start, drained at shutdown."""
    from serving.manager import ModelManager
    from serving.metrics import ServerMetrics
    from serving.repository import ModelRepository

    settings: Settings = app.state.settings
    repository = ModelRepository(settings.repository)
    metrics = ServerMetrics()
    models = ModelManager(repository, metrics, settings)
    app.state.repository = repository
    app.state.metrics = metrics
    app.state.models = models
    app.state.limits = settings.protocol_limits()
    await models.start()
    try:
        yield
    finally:
        await models.close(settings.drain_timeout_s)


def default_routers() -> list[APIRouter]:
    """The routers every server has."""
    from serving.routers import health, infer, jobs, metrics, models, repository

    return [
        health.router,
        models.router,
        infer.router,
        repository.router,
        metrics.router,
        jobs.router,
    ]


def optimization_jobs(app: FastAPI) -> contextlib.AbstractAsyncContextManager[Any]:
    """Upload/optimization jobs (``app.state.jobs``), started after the serving core."""
    from serving.jobs.service import job_service

    return job_service(app)


LIFESPAN_PARTS: list[LifespanPart] = [serving_core, optimization_jobs]

# API-key scope of each router, by tag (serving/auth.py); health stays open for probes and
# a router with an unknown tag needs the admin key.
ROUTER_SCOPES: dict[str, Scope | None] = {
    "health": None,
    "models": "infer",
    "inference": "infer",
    "metrics": "metrics",
    "repository": "admin",
    "optimize": "admin",
}


def router_scope(router: APIRouter) -> Scope | None:
    """The API-key scope guarding ``router``'s routes."""
    scopes = {ROUTER_SCOPES.get(str(tag), "admin") for tag in router.tags} or {"admin"}
    if scopes == {None}:
        return None
    return "admin" if "admin" in scopes else next(s for s in scopes if s is not None)


async def slimserve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SlimServeError)
    return error_response(exc)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
        for err in exc.errors()
    )
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no endpoint {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal server error"}, status_code=500)


EXCEPTION_HANDLERS = {
    SlimServeError: slimserve_error,
    RequestValidationError: validation_error,
    StarletteHTTPException: http_error,
    Exception: internal_error,
}


def build_app(
    settings: Settings | None = None,
    *,
    routers: Sequence[APIRouter] | None = None,
    lifespan_parts: Sequence[LifespanPart] | None = None,
    fast_infer: bool = True,
) -> FastAPI:
    """The ASGI app serving ``settings.repository``.

    ``fast_infer`` answers infer requests in an ASGI middleware ahead of FastAPI's routing
    (same behaviour, less CPU per request); False routes them through the FastAPI routes.
    """
    settings = settings or Settings()
    parts = list(LIFESPAN_PARTS if lifespan_parts is None else lifespan_parts)
    if settings.metrics_port is not None:
        from serving.routers.metrics import metrics_port

        parts.append(metrics_port)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for part in parts:
                await stack.enter_async_context(part(app))
            yield

    app = FastAPI(
        title="slimserve",
        summary="KServe v2 / Triton-compatible inference server for compressed models",
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.settings = settings
    app.state.api_keys = ApiKeys.from_settings(settings)
    for router in default_routers() if routers is None else routers:
        if settings.metrics_port is not None and "metrics" in router.tags:
            continue  # served on its own port (serving.routers.metrics.metrics_port)
        scope = router_scope(router)
        app.include_router(router, dependencies=[Depends(require(scope))] if scope else None)
    if fast_infer:
        from serving.routers.infer import InferFastPath

        app.add_middleware(InferFastPath)
    if settings.cors_origins:  # added last: the outermost layer, so it covers the fast path
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    return app


def build_server_app(settings: Settings) -> ASGIApp:
    """What ``slimserve serve`` hands to uvicorn: ``build_app``'s app with the infer fast path
    wrapped around the whole of it, so infer requests also skip FastAPI's per-request
    telemetry check and outer middleware layers (less CPU per request). With CORS origins
    configured the fast path stays inside the CORS middleware (``build_app``'s placement)."""
    if settings.cors_origins:
        return build_app(settings)
    from serving.routers.infer import InferFastPath

    return InferFastPath(build_app(settings, fast_infer=False))
