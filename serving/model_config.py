"""Read, write and auto-complete Triton ``config.pbtxt`` files.

Parsing and printing go through the real Triton protobuf schema
(``tritonclient.grpc.model_config_pb2.ModelConfig``) and ``google.protobuf.text_format``,
so a config written here loads in Triton and a Triton config loads here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.datatypes import ONNX_TO_V2, V2_TO_CONFIG
from serving.errors import RepositoryError

ModelConfig = mc.ModelConfig
CONFIG_FILENAME = "config.pbtxt"

PLATFORM_FILES = {
    "onnxruntime_onnx": "model.onnx",
    "tensorrt_plan": "model.plan",
}


def parse_config(text: str, *, source: str = CONFIG_FILENAME) -> mc.ModelConfig:
    """Parse config.pbtxt text; a syntax error becomes ``RepositoryError`` naming the line."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise RepositoryError(f"{source}: {exc}") from None
    return config


def config_from_json(data: dict[str, Any] | str) -> mc.ModelConfig:
    """Build a config from Triton's JSON form (the ``config`` parameter of a load request)."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise RepositoryError(f"config parameter is not valid JSON: {exc}") from None
    config = mc.ModelConfig()
    try:
        json_format.ParseDict(data, config, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise RepositoryError(
            f"config parameter does not match Triton's ModelConfig: {exc}"
        ) from None
    return config


def config_to_json(config: mc.ModelConfig) -> dict[str, Any]:
    """The config in Triton's JSON form (what ``GET .../config`` returns)."""
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def format_config(config: mc.ModelConfig) -> str:
    """Text-format a config for writing to config.pbtxt."""
    return text_format.MessageToString(config)


def read_config(model_dir: Path) -> mc.ModelConfig:
    """Read ``<model_dir>/config.pbtxt``; an empty config when the file does not exist."""
    path = model_dir / CONFIG_FILENAME
    if not path.exists():
        return mc.ModelConfig()
    return parse_config(path.read_text(encoding="utf-8"), source=str(path))


def write_config(model_dir: Path, config: mc.ModelConfig) -> Path:
    """Write ``config.pbtxt`` atomically (temp file + fsync + rename)."""
    from serving.fileutil import atomic_write_text

    path = model_dir / CONFIG_FILENAME
    atomic_write_text(path, format_config(config))
    return path


def datatype_name(value: int) -> str:
    """``TYPE_FP32`` for the enum value."""
    return mc.DataType.Name(value)


def v2_of(config_dtype: int) -> str:
    """The v2 datatype name ("FP32") of a config DataType enum value."""
    name = mc.DataType.Name(config_dtype)
    return "BYTES" if name == "TYPE_STRING" else name.removeprefix("TYPE_")


def _onnx_io(
    model_path: Path,
) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(name, v2 datatype, dims with -1 for dynamic) of an ONNX graph's real inputs/outputs."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def describe(values: Any) -> list[tuple[str, str, list[int]]]:
        out = []
        for value in values:
            if value.name in initializers:
                continue
            tensor_type = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
            dtype = ONNX_TO_V2.get(tensor_type.elem_type)
            if dtype is None:
                raise RepositoryError(
                    f"{model_path}: tensor '{value.name}' has ONNX element type "
                    f"{tensor_type.elem_type}, which the v2 protocol cannot carry"
                )
            out.append((value.name, dtype, dims))
        return out

    return describe(model.graph.input), describe(model.graph.output)


def autocomplete_from_onnx(
    config: mc.ModelConfig, model_path: Path, *, name: str
) -> mc.ModelConfig:
    """Fill what the config leaves out from the ONNX graph, as Triton's auto-complete does.

    Sets name, platform, inputs, outputs (dtype, dims) and ``max_batch_size`` (when every
    input and output has a dynamic first dimension and the config does not say otherwise).
    Fields the config already sets are kept.
    """
    completed = mc.ModelConfig()
    completed.CopyFrom(config)
    if not completed.name:
        completed.name = name
    if not completed.platform and not completed.backend:
        completed.platform = "onnxruntime_onnx"
    inputs, outputs = _onnx_io(model_path)
    batchable = all(dims and dims[0] == -1 for _, _, dims in inputs + outputs)
    if not completed.input and not completed.output and completed.max_batch_size == 0 and batchable:
        completed.max_batch_size = 8
    strip = 1 if completed.max_batch_size > 0 else 0

    def fill(existing: Any, described: list[tuple[str, str, list[int]]]) -> None:
        by_name = {t.name: t for t in existing}
        for tensor_name, dtype, dims in described:
            tensor = by_name.get(tensor_name)
            if tensor is None:
                tensor = existing.add()
                tensor.name = tensor_name
            if tensor.data_type == mc.TYPE_INVALID:
                tensor.data_type = mc.DataType.Value(V2_TO_CONFIG[dtype])
            if not tensor.dims:
                tensor.dims.extend(dims[strip:])

    fill(completed.input, inputs)
    fill(completed.output, outputs)
    return completed
