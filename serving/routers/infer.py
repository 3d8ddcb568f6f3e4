"""``POST /v2/models/{m}[/versions/{v}]/infer``: the hot path, kept lean.

Raw body in (no Content-Type needed), ``serving.protocol`` to decode and encode (orjson,
binary tensors), the version's ``DynamicBatcher`` to run, ``Response(bytes)`` out. A client
that disconnects while its request waits gets the request cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.auth import authorize
from serving.batching import DynamicBatcher
from serving.errors import InvalidInput, PayloadTooLarge, SlimServeError
from serving.manager import LoadedVersion
from serving.protocol import (
    HEADER_LENGTH,
    ProtocolLimits,
    check_inputs,
    compress_body,
    decode_infer_request,
    decompress_body,
    encode_infer_response,
)
from serving.routers.deps import parse_version
from serving.routers.responses import error_response

log = logging.getLogger(__name__)
router = APIRouter(tags=["inference"])

CLIENT_CLOSED = 499  # nginx's "client closed request"; nobody reads it


class ClientDisconnected(SlimServeError):
    status_code = CLIENT_CLOSED
    reason = "cancelled"


@dataclass(slots=True)
class InferHeaders:
    """The request headers the infer path reads, picked from ASGI's raw header list in one
    pass (no ``Headers`` object per request)."""

    content_length: str | None = None
    content_encoding: str | None = None
    header_length: str | None = None
    accept_encoding: str | None = None

    @classmethod
    def from_scope(cls, scope: Scope) -> InferHeaders:
        found = cls()
        for key, value in scope["headers"]:
            attribute = _WANTED.get(key.lower())
            if attribute is not None:
                setattr(found, attribute, value.decode("latin-1"))
        return found


_WANTED = {
    b"content-length": "content_length",
    b"content-encoding": "content_encoding",
    HEADER_LENGTH.lower().encode(): "header_length",
    b"accept-encoding": "accept_encoding",
}


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes (413)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending its request")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        raise InvalidInput(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    return int(value)


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def submit_cancellable(
    receive: Receive, batcher: DynamicBatcher, arrays: dict[str, np.ndarray], **options: Any
) -> tuple[dict[str, np.ndarray], Any]:
    """Submit to the batcher; cancel the request when the client disconnects first.

    The submit runs in the request's own task (no extra task per request); a watcher task
    waiting for ``http.disconnect`` (``receive`` after the body) cancels it when the client
    goes away.
    """
    current = asyncio.current_task()
    assert current is not None
    watcher = asyncio.ensure_future(_wait_disconnect(receive))

    def on_disconnect(done: asyncio.Future[None]) -> None:
        if not done.cancelled():
            current.cancel("client disconnected")

    watcher.add_done_callback(on_disconnect)
    try:
        return await batcher.submit(arrays, **options)
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            current.uncancel()
            raise ClientDisconnected("the client disconnected before its request ran") from None
        raise
    finally:
        watcher.remove_done_callback(on_disconnect)
        watcher.cancel()


def _check_outputs(loaded: LoadedVersion, names: list[str] | None) -> None:
    if names is None:
        return
    known = {spec.name for spec in loaded.outputs}
    for name in names:
        if name not in known:
            expected = ", ".join(f"'{n}'" for n in sorted(known))
            raise InvalidInput(f"unknown output '{name}'; the model has outputs {expected}")


async def infer_bytes(
    request: Request, name: str, version: str | None
) -> tuple[bytes, dict[str, str]]:
    """``infer_raw`` for a Starlette request (the documented FastAPI routes)."""
    return await infer_raw(request.app.state, request.scope, request.receive, name, version)


async def infer_raw(
    state: Any, scope: Scope, receive: Receive, name: str, version: str | None
) -> tuple[bytes, dict[str, str]]:
    """Decode, check, batch, encode; metrics and statistics for every outcome."""
    started = time.perf_counter_ns()
    if state.api_keys.infer is not None:
        authorize(Request(scope, receive), "infer")
    loaded: LoadedVersion = state.models.get(name, parse_version(version))
    limits: ProtocolLimits = state.limits
    metrics = state.metrics
    label = str(loaded.version)
    headers = InferHeaders.from_scope(scope)
    with loaded.use():
        try:
            raw = await read_body(receive, headers.content_length, limits.max_body_bytes)
            body = decompress_body(raw, headers.content_encoding, limits)
            decoded = decode_infer_request(
                body, header_length=_header_length(headers.header_length), limits=limits
            )
            arrays = check_inputs(decoded, loaded.inputs, loaded.config.max_batch_size)
            output_names = decoded.output_names
            _check_outputs(loaded, output_names)
            outputs, timings = await submit_cancellable(
                receive,
                loaded.batcher,
                arrays,
                output_names=output_names,
                priority=decoded.priority,
                timeout_us=decoded.timeout_us,
            )
            content, out_headers = encode_infer_response(
                model_name=name, model_version=label, request=decoded, outputs=outputs
            )
        except Exception as exc:
            elapsed = time.perf_counter_ns() - started
            reason = exc.reason if isinstance(exc, SlimServeError) else "internal"
            metrics.request_failed(name, label, reason=reason, request_ns=elapsed)
            loaded.statistics.record_failure(elapsed)
            raise
    if headers.accept_encoding:
        content, encoding = compress_body(content, headers.accept_encoding)
        if encoding:
            out_headers["Content-Encoding"] = encoding
    rows = next(iter(arrays.values())).shape[0] if loaded.config.max_batch_size > 0 else 1
    elapsed = time.perf_counter_ns() - started
    metrics.request_succeeded(name, label, request_ns=elapsed, timings=timings, rows=rows)
    loaded.statistics.record_success(timings, rows, request_ns=elapsed)
    if loaded.shadow is not None:  # sampled copy to the source version, off the request path
        loaded.shadow.offer(arrays, outputs, output_names)
    return content, out_headers


_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string", "example": "FP32"},
        "parameters": {"type": "object"},
        "data": {"type": "array", "description": "row-major values (may be nested)"},
    },
}
# The body is read raw (JSON, or JSON header + binary tensors); described here for clients
# and schema fuzzing.
INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _TENSOR},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "binary tensor extension: JSON header of "
                    "Inference-Header-Content-Length bytes, then the tensors' bytes",
                }
            },
        },
    }
}


# The documented routes (OpenAPI); requests normally take InferFastPath below instead.
@router.post("/v2/models/{name}/infer", openapi_extra=INFER_DOC)
async def infer(name: str, request: Request) -> Response:
    """Run inference on the newest ready version."""
    content, headers = await infer_bytes(request, name, None)
    return Response(content=content, headers=headers)


@router.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_DOC)
async def infer_version(name: str, version: str, request: Request) -> Response:
    """Run inference on one version."""
    content, headers = await infer_bytes(request, name, version)
    return Response(content=content, headers=headers)


_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


class InferFastPath:
    """ASGI middleware answering ``POST .../infer`` without FastAPI's routing and dependency
    machinery (a third of the CPU time of a small request); everything else passes through.
    Errors get the same ``{"error": ...}`` bodies as the app's exception handlers.

    Placed around the whole FastAPI app (``serving.app.build_server_app``) it also skips
    FastAPI's per-request telemetry check and its outer middleware layers; ``scope["app"]``
    is then set to the wrapped app, as Starlette would.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.outermost = isinstance(app, Starlette)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = _INFER_PATH.match(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        if self.outermost:
            scope["app"] = self.app
        try:
            content, headers = await infer_raw(
                scope["app"].state, scope, receive, match.group(1), match.group(2)
            )
        except SlimServeError as exc:
            if isinstance(exc, ClientDisconnected):
                return
            await error_response(exc)(scope, receive, send)
            return
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            await JSONResponse({"error": "internal server error"}, status_code=500)(
                scope, receive, send
            )
            return
        raw_headers = [(b"content-length", str(len(content)).encode("latin-1"))]
        raw_headers += [
            (key.lower().encode("latin-1"), value.encode("latin-1"))
            for key, value in headers.items()
        ]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        await send({"type": "http.response.body", "body": content})
