"""Model resources: metadata, readiness, config and statistics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from serving.backends import TensorSpec
from serving.errors import ModelNotReady
from serving.manager import LoadedVersion, ModelManager
from serving.model_config import config_to_json
from serving.routers.deps import ModelsDep, parse_version

router = APIRouter(tags=["models"])


def _tensors(specs: list[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


def _version_stats(loaded: LoadedVersion) -> dict[str, Any]:
    stats = loaded.statistics.to_dict(loaded.name, str(loaded.version))
    if loaded.shadow is not None:  # rolling agreement with the source version
        stats["shadow"] = loaded.shadow.summary()
    return stats


def _stats(versions: list[LoadedVersion]) -> JSONResponse:
    return JSONResponse({"model_stats": [_version_stats(v) for v in versions]})


# registered before /v2/models/{name} so that "stats" is not taken for a model name
@router.get("/v2/models/stats")
async def all_stats(models: ModelsDep) -> JSONResponse:
    """Statistics of every loaded version (Triton's ``model_stats`` list)."""
    return _stats(models.loaded_versions())


def _metadata(models: ModelManager, name: str, version: str | None) -> JSONResponse:
    loaded = models.get(name, parse_version(version))
    record = models.record(name)
    versions = [str(v.version) for v in record.ready_versions()] if record else []
    return JSONResponse(
        {
            "name": name,
            "versions": versions,
            "platform": loaded.config.platform or loaded.config.backend,
            "inputs": _tensors(loaded.inputs),
            "outputs": _tensors(loaded.outputs),
        }
    )


@router.get("/v2/models/{name}")
async def metadata(name: str, models: ModelsDep) -> JSONResponse:
    """Name, versions, platform, inputs and outputs (the newest ready version)."""
    return _metadata(models, name, None)


@router.get("/v2/models/{name}/versions/{version}")
async def version_metadata(name: str, version: str, models: ModelsDep) -> JSONResponse:
    """Metadata of one version."""
    return _metadata(models, name, version)


def _ready(models: ModelManager, name: str, version: str | None) -> Response:
    try:  # an unknown model or version is a client mistake (404), not an unready server
        models.get(name, parse_version(version))
    except ModelNotReady as exc:
        return JSONResponse({"name": name, "ready": False, "error": str(exc)}, status_code=503)
    return JSONResponse({"name": name, "ready": True})


@router.get("/v2/models/{name}/ready")
async def model_ready(name: str, models: ModelsDep) -> Response:
    """200 when the model can serve, else 503 with the reason."""
    return _ready(models, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready")
async def version_ready(name: str, version: str, models: ModelsDep) -> Response:
    """200 when this version can serve, else 503 with the reason."""
    return _ready(models, name, version)


@router.get("/v2/models/{name}/config")
async def model_config(name: str, models: ModelsDep) -> JSONResponse:
    """The model's config in Triton's JSON form."""
    return JSONResponse(config_to_json(models.config_of(name)))


@router.get("/v2/models/{name}/versions/{version}/config")
async def version_config(name: str, version: str, models: ModelsDep) -> JSONResponse:
    """The config (shared by every version of a model)."""
    return JSONResponse(config_to_json(models.get(name, parse_version(version)).config))


@router.get("/v2/models/{name}/stats")
async def model_stats(name: str, models: ModelsDep) -> JSONResponse:
    """Statistics of every ready version of the model."""
    models.get(name)
    record = models.record(name)
    return _stats(record.ready_versions() if record else [])


@router.get("/v2/models/{name}/versions/{version}/stats")
async def version_stats(name: str, version: str, models: ModelsDep) -> JSONResponse:
    """Statistics of one version."""
    return _stats([models.get(name, parse_version(version))])
