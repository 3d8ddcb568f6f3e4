"""The ``request`` part of an upload: what to optimize for, validated with field names."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.errors import InvalidInput
from serving.fileutil import validate_model_name


class OptimizeRequestBody(BaseModel):
    """The JSON ``request`` form part of ``POST /v2/optimize``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(description="model name to publish under (new or existing)")
    target: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    batch_size: int = Field(8, ge=1, le=4096)
    seq_len: int = Field(128, ge=1, le=65536)
    min_cosine: float | None = Field(0.99, ge=-1.0, le=1.0)
    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0)
    time_budget_s: float | None = Field(None, ge=1.0, le=7 * 86400)
    allow: list[str] | None = Field(None, description="pass names the search may use")
    require: list[str] | None = Field(
        None, description="pass names the served result must contain (also allowed)"
    )
    static_shape: bool = Field(
        False,
        strict=True,
        description="time OpenVINO candidates compiled for batch_size x seq_len only, and "
        "list that shape in the served config's static_shapes",
    )


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "request"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def parse_request(text: str | None) -> dict[str, Any]:
    """Validate the ``request`` part; returns the options for ``OptimizationRequest``.

    Every mistake is ``InvalidInput`` naming the field.
    """
    if text is None:
        raise InvalidInput("the upload has no 'request' part (JSON with at least 'name')")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"request: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput("request: must be a JSON object")
    try:
        body = OptimizeRequestBody.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"invalid optimization request: {_describe(exc)}") from None
    try:
        validate_model_name(body.name)
    except InvalidInput as exc:
        raise InvalidInput(f"name: {exc}") from None
    options = body.model_dump()
    from optimizers.api import OptimizationRequest  # the pipeline's public entry point

    return OptimizationRequest.from_dict(options).to_dict()
