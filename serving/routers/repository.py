"""Model repository API: index, load (with ``config`` and ``file:`` overrides), unload."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serving.errors import InvalidInput, PayloadTooLarge
from serving.model_config import config_from_json
from serving.routers.deps import ModelsDep, SettingsDep

router = APIRouter(tags=["repository"])


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object body ({} when empty), bounded by ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {limit}")
    body = await request.body()
    if len(body) > limit:
        raise PayloadTooLarge(f"request body of {len(body)} bytes exceeds the limit of {limit}")
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    return doc


@router.post("/v2/repository/index")
async def repository_index(request: Request, models: ModelsDep) -> JSONResponse:
    """Every model and version with its state and reason; ``{"ready": true}`` filters."""
    doc = await _json_body(request, 1 << 16)
    ready = doc.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput("'ready' must be true or false")
    return JSONResponse(models.index(ready_only=ready))


@router.post("/v2/repository/models/{name}/load")
async def load_model(
    name: str, request: Request, models: ModelsDep, settings: SettingsDep
) -> Response:
    """Load or reload a model; ``parameters.config`` (JSON string) overrides its config and
    ``parameters["file:<version>/<path>"]`` (base64) add version files, as in Triton."""
    doc = await _json_body(request, settings.max_upload_bytes)
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be a JSON object")
    config = None
    files: dict[str, bytes] = {}
    for key, value in parameters.items():
        if key == "config":
            if not isinstance(value, str):
                raise InvalidInput("parameter 'config' must be a JSON string of the model config")
            config = config_from_json(value)
        elif key.startswith("file:"):
            if not isinstance(value, str):
                raise InvalidInput(f"parameter '{key}' must be a base64 string")
            try:
                files[key.removeprefix("file:")] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput(f"parameter '{key}' is not valid base64") from None
        else:
            raise InvalidInput(
                f"unknown load parameter '{key}'; use 'config' and 'file:<version>/<path>'"
            )
    await models.load(name, config=config, files=files or None)
    return Response(status_code=200)


@router.post("/v2/repository/models/{name}/unload")
async def unload_model(name: str, request: Request, models: ModelsDep) -> Response:
    """Unload every version; running requests finish first."""
    doc = await _json_body(request, 1 << 16)
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be a JSON object")
    await models.unload(name)
    return Response(status_code=200)
