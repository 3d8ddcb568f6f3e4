"""Request dependencies: the server's services, read from ``request.app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.errors import InvalidInput
from serving.manager import ModelManager
from serving.metrics import ServerMetrics
from serving.protocol import ProtocolLimits
from serving.repository import ModelRepository
from serving.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_models(request: Request) -> ModelManager:
    return request.app.state.models


def get_metrics(request: Request) -> ServerMetrics:
    return request.app.state.metrics


def get_repository(request: Request) -> ModelRepository:
    return request.app.state.repository


def get_limits(request: Request) -> ProtocolLimits:
    return request.app.state.limits


SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelsDep = Annotated[ModelManager, Depends(get_models)]
MetricsDep = Annotated[ServerMetrics, Depends(get_metrics)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
LimitsDep = Annotated[ProtocolLimits, Depends(get_limits)]


def parse_version(version: str | None) -> int | None:
    """A URL's ``versions/{v}`` as an int (None or "" = let the server choose)."""
    if version is None or version == "":
        return None
    if not version.isdigit() or int(version) < 1:
        raise InvalidInput(f"model version must be a positive integer, got {version!r}")
    return int(version)
