"""Small ONNX models built with ``onnx.helper`` and Triton-layout test repositories."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serving.model_config import ModelConfig, config_from_json, write_config

OPSET = 17

# v2 datatype -> ONNX element type, for every type the identity model carries.
ALL_TYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def add_sub_model(width: int = 16) -> bytes:
    """``OUTPUT0 = INPUT0 + INPUT1``, ``OUTPUT1 = INPUT0 - INPUT1``; FP32 ``[-1, width]``."""
    shape = ["batch", width]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("INPUT0", "INPUT1")
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("OUTPUT0", "OUTPUT1")
    ]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return _model(helper.make_graph(nodes, "add_sub", inputs, outputs))


def scaled_model(scale: float, width: int = 4) -> bytes:
    """``y = x * scale`` with FP32 ``[-1, width]``: versions distinguishable by their output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    k = numpy_helper.from_array(np.array(scale, dtype=np.float32), "k")
    node = helper.make_node("Mul", ["x", "k"], ["y"])
    return _model(helper.make_graph([node], "scaled", [x], [y], initializer=[k]))


def all_types_model() -> bytes:
    """``OUT_<T> = Identity(IN_<T>)`` for every v2 datatype, each ``[-1, 3]``."""
    inputs, outputs, nodes = [], [], []
    for name, elem in ALL_TYPES.items():
        inputs.append(helper.make_tensor_value_info(f"IN_{name}", elem, ["batch", 3]))
        outputs.append(helper.make_tensor_value_info(f"OUT_{name}", elem, ["batch", 3]))
        nodes.append(helper.make_node("Identity", [f"IN_{name}"], [f"OUT_{name}"]))
    return _model(helper.make_graph(nodes, "all_types", inputs, outputs))


def slow_model(size: int = 1024, repeats: int = 1) -> bytes:
    """``y = x + 0 * sum(W @ W ...)``: FP32 ``[-1, 4]`` costing ~``2 * repeats * size^3`` FLOPs.

    The matrix product depends on the input (``W + 0 * sum(x)``), so ONNX Runtime cannot
    fold it away at load time; every batch really pays for it, whatever its size.
    """
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((size, size)) / size).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    inits = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
        helper.make_node("Mul", ["sx", "zero"], ["z"]),
        helper.make_node("Add", ["W", "z"], ["m0"]),
    ]
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "W"], [f"m{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"m{repeats}"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["sz"]),
        helper.make_node("Add", ["x", "sz"], ["y"]),
    ]
    return _model(helper.make_graph(nodes, "slow", [x], [y], initializer=inits))


def mlp_model(width: int = 512, depth: int = 4, features: int = 64, seed: int = 0) -> bytes:
    """A compute-heavy MLP: FP32 ``x [-1, features]`` -> ``y [-1, 10]`` through ReLU layers."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])
    inits, nodes = [], []
    previous, fan_in = "x", features
    for i in range(depth):
        out = width if i < depth - 1 else 10
        w = (rng.standard_normal((fan_in, out)) / np.sqrt(fan_in)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(np.zeros(out, np.float32), f"b{i}"))
        name = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [f"g{i}"]))
        if i < depth - 1:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [name]))
        else:
            nodes.append(helper.make_node("Identity", [f"g{i}"], [name]))
        previous, fan_in = name, out
    return _model(helper.make_graph(nodes, "mlp", [x], [y], initializer=inits))


def config(data: dict | None = None) -> ModelConfig:
    """A ModelConfig from Triton's JSON form (``{}`` leaves everything to auto-complete)."""
    return config_from_json(data or {})


def write_model(
    root: Path,
    name: str,
    model: bytes,
    *,
    versions: tuple[int, ...] = (1,),
    model_config: dict | None = None,
) -> Path:
    """Write ``root/name/config.pbtxt`` and ``root/name/<v>/model.onnx`` for each version."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if model_config is not None:
        write_config(folder, config(model_config))
    for version in versions:
        (folder / str(version)).mkdir(exist_ok=True)
        (folder / str(version) / "model.onnx").write_bytes(model)
    return folder


ADD_SUB_CONFIG = {
    "platform": "onnxruntime_onnx",
    "max_batch_size": 8,
    "dynamic_batching": {"max_queue_delay_microseconds": 2000},
}


def basic_repository(root: Path) -> Path:
    """``add_sub`` (dynamic batching, batch 8) and ``all_types`` (auto-completed config)."""
    root.mkdir(parents=True, exist_ok=True)
    write_model(root, "add_sub", add_sub_model(), model_config=ADD_SUB_CONFIG)
    write_model(root, "all_types", all_types_model())
    return root


def external_data_model(location: str) -> bytes:
    """An ONNX model whose one weight claims to live in ``location`` (no data written)."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "ext", [x], [y], initializer=[weight]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # not checked: the checker would refuse the hostile location itself
    return model.SerializeToString()


def tar_with_link(target: str, *, hard: bool = False) -> bytes:
    """A tar.gz with a real ``m/model.onnx`` and ``m/weights.bin`` as a link to ``target``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = scaled_model(2.0)
        info = tarfile.TarInfo("m/model.onnx")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("m/weights.bin")
        link.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
        link.linkname = target
        archive.addfile(link)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip archive of ``members`` (name -> content), in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()
