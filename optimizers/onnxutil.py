"""Small ONNX helpers: saving (external data when large), sessions per target, graph I/O."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

# Protobuf cannot hold more than 2 GiB; stay well below it before switching to external data.
EXTERNAL_DATA_THRESHOLD = 1_500_000_000

ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}

TARGET_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


@dataclass(frozen=True)
class IOSpec:
    """One graph input or output: name, numpy dtype, dims (int, or str for symbolic/None)."""

    name: str
    dtype: Any
    dims: tuple[int | str | None, ...]


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Save ``model`` to ``path``; weights go to ``<name>.data`` beside it when large."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data_file = path.with_name(path.name + ".data")
    data_file.unlink(missing_ok=True)
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_file.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def load_model(path: Path, *, weights: bool = True) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=weights)


def model_files(path: Path) -> dict[str, Path]:
    """``{relative name: file}`` for an ONNX file and the external-data files it references."""
    files = {path.name: path}
    model = onnx.load(str(path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files[entry.value] = path.parent / entry.value
    return files


def providers_for(target: str) -> tuple[list[str], list[str]]:
    """(providers to request, the ones actually available) for a target."""
    import onnxruntime as ort

    wanted = TARGET_PROVIDERS.get(target, TARGET_PROVIDERS["cpu"])
    available = set(ort.get_available_providers())
    return wanted, [p for p in wanted if p in available]


def make_session(
    path: Path,
    target: str = "cpu",
    *,
    threads: int | None = None,
    accelerator: str | None = None,
    static_shape: dict[str, tuple[int, ...]] | None = None,
):
    """An ONNX Runtime session for ``target`` (providers that are not installed are skipped);
    ``accelerator="openvino"`` on the CPU target runs it on the OpenVINO plugin EP, compiled
    for exactly ``static_shape`` when given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if accelerator == "openvino" and target == "cpu":
        from serving.backends.openvino import add_openvino

        add_openvino(options, threads=threads, static_shape=static_shape)
        return ort.InferenceSession(str(path), options)
    _wanted, usable = providers_for(target)
    return ort.InferenceSession(str(path), options, providers=usable or ["CPUExecutionProvider"])


def graph_io(path: Path) -> tuple[list[IOSpec], list[IOSpec]]:
    """Real inputs (initializers excluded) and outputs of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> IOSpec:
        tensor_type = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
        return IOSpec(value.name, ONNX_TO_NUMPY.get(tensor_type.elem_type, np.float32), dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]


def input_shapes(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shapes ``feeds`` give the graph's inputs (feeds it does not take are left out)."""
    return {
        spec.name: tuple(feeds[spec.name].shape) for spec in graph_io(path)[0] if spec.name in feeds
    }


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type the graph has (top level)."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def check_loads(path: Path) -> None:
    """Raise if ONNX Runtime cannot build a CPU session for the file (the real validity test:
    fused graphs use contrib ops ``onnx.checker`` does not know)."""
    make_session(path, "cpu", threads=1)
