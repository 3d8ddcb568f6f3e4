"""TensorRT engine backend: sidecar metadata, refusals, dtype map, profiles, buffers, placement.

Everything above the GPU section runs on any machine. The GPU section builds a tiny ONNX
model into a real plan and compares the served outputs with onnxruntime; it skips (with the
reason) without TensorRT and a CUDA device.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving.backends import load_engine
from serving.backends.base import TensorSpec
from serving.backends.tensorrt import (
    TRT_TO_V2,
    GpuEnvironment,
    PlanMetadata,
    TensorRTEngine,
    buffer_bytes,
    check_compatible,
    compatibility_problems,
    instance_device,
    max_buffer_sizes,
    max_input_shapes,
    metadata_path,
    read_metadata,
    select_profile,
    trt_to_v2,
    write_metadata,
)
from serving.datatypes import V2_TO_NUMPY
from serving.errors import InvalidInput, ModelNotReady, RepositoryError
from serving.model_config import parse_config, write_config
from tests.models import add_sub_model, write_model

BERT_PROFILE = {
    "input_ids": ((1, 1), (8, 128), (32, 512)),
    "attention_mask": ((1, 1), (8, 128), (32, 512)),
}
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
H100 = GpuEnvironment("10.9.0.34", "9.0", "NVIDIA H100 80GB HBM3")


def _metadata(**changes) -> PlanMetadata:
    values = {
        "tensorrt_version": "10.9.0.34",
        "compute_capability": "9.0",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "profiles": [BERT_PROFILE],
        "inputs": [
            TensorSpec("input_ids", "INT64", (-1, -1)),
            TensorSpec("attention_mask", "INT64", (-1, -1)),
        ],
        "outputs": [TensorSpec("last_hidden_state", "FP32", (-1, -1, 384))],
        **changes,
    }
    return PlanMetadata(**values)


def _plan_version(root: Path, metadata: PlanMetadata | None, gpus: str = "[ 0 ]") -> Path:
    """``root/plan_model`` (platform tensorrt_plan) with version 1 holding a plan file."""
    folder = root / "plan_model"
    (folder / "1").mkdir(parents=True)
    write_config(
        folder,
        parse_config(
            'platform: "tensorrt_plan"\nmax_batch_size: 8\n'
            'input { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }\n'
            'output { name: "y" data_type: TYPE_FP32 dims: [ 3 ] }\n'
            f"instance_group {{ kind: KIND_GPU count: 1 gpus: {gpus} }}\n"
        ),
    )
    plan = folder / "1" / "model.plan"
    plan.write_bytes(b"not a real engine: refused before TensorRT reads it")
    if metadata is not None:
        write_metadata(plan, metadata)
    return plan


# --- dtype mapping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trt_name", "v2"),
    [
        ("FLOAT", "FP32"),
        ("HALF", "FP16"),
        ("INT8", "INT8"),
        ("INT32", "INT32"),
        ("INT64", "INT64"),
        ("BOOL", "BOOL"),
        ("UINT8", "UINT8"),
    ],
)
def test_trt_datatypes_map_to_v2_and_numpy(trt_name: str, v2: str) -> None:
    class FakeDataType:  # the shape of a tensorrt.DataType member: it has a .name
        name = trt_name

    assert trt_to_v2(trt_name) == v2
    assert trt_to_v2(FakeDataType()) == v2
    assert trt_to_v2(f"DataType.{trt_name}") == v2
    assert v2 in V2_TO_NUMPY


@pytest.mark.parametrize("trt_name", ["BF16", "FP8", "INT4", "FP4"])
def test_trt_types_without_a_numpy_dtype_are_refused(trt_name: str) -> None:
    with pytest.raises(ModelNotReady, match=f"{trt_name} has no v2 datatype"):
        trt_to_v2(trt_name)
    assert set(TRT_TO_V2.values()) <= set(V2_TO_NUMPY)


# --- sidecar metadata ----------------------------------------------------------------------


def test_metadata_round_trips_through_the_sidecar(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    metadata = _metadata(extra={"onnx_sha256": "ab" * 32})
    written = write_metadata(plan, metadata)
    assert written == metadata_path(plan) == tmp_path / "model.plan.json"
    data = json.loads(written.read_text())
    assert data["profiles"][0]["input_ids"] == [[1, 1], [8, 128], [32, 512]]
    assert read_metadata(plan) == metadata


def test_plan_without_sidecar_is_not_ready(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    with pytest.raises(ModelNotReady, match=r"no model\.plan\.json beside it"):
        read_metadata(plan)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("compute_capability"), "lacks field 'compute_capability'"),
        (lambda d: d.update(format=99), "format 99 is not supported"),
        (lambda d: d["profiles"][0].update(input_ids=[[1, 1], [32, 512]]), "needs \\[min, opt"),
        (lambda d: d["inputs"][0].update(shape="dynamic"), "malformed"),
    ],
)
def test_broken_sidecar_is_a_repository_error(tmp_path: Path, edit, message: str) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    data = _metadata().to_json()
    edit(data)
    metadata_path(plan).write_text(json.dumps(data))
    with pytest.raises(RepositoryError, match=message):
        read_metadata(plan)
    metadata_path(plan).write_text("{not json")
    with pytest.raises(RepositoryError, match="not readable JSON"):
        read_metadata(plan)


# --- compatibility with this machine -------------------------------------------------------


def test_same_release_and_capability_is_compatible() -> None:
    assert compatibility_problems(_metadata(), H100) == []
    patch = GpuEnvironment("10.9.1.2", "9.0", H100.gpu_name)
    assert compatibility_problems(_metadata(), patch) == []


def test_other_tensorrt_version_and_capability_are_both_named() -> None:
    a100 = GpuEnvironment("11.4.0", "8.0", "NVIDIA A100-SXM4-40GB")
    problems = compatibility_problems(_metadata(), a100)
    assert problems == [
        "built with TensorRT 10.9.0.34, this machine has TensorRT 11.4.0",
        "built for compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU is 8.0 "
        "(NVIDIA A100-SXM4-40GB)",
    ]
    with pytest.raises(ModelNotReady, match="not portable across TensorRT versions") as info:
        check_compatible(_metadata(), a100, "model.plan")
    assert "TensorRT 11.4.0" in str(info.value)
    assert "compute capability 9.0" in str(info.value)


def test_other_gpu_of_the_same_capability_loads_with_a_warning(caplog) -> None:
    h200 = GpuEnvironment(H100.tensorrt_version, "9.0", "NVIDIA H200")
    with caplog.at_level(logging.WARNING, logger="serving.backends.tensorrt"):
        check_compatible(_metadata(), h200, "model.plan")
    assert "built on NVIDIA H100 80GB HBM3, running on NVIDIA H200" in caplog.text


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (GpuEnvironment("11.4.0", "9.0", "NVIDIA H100 80GB HBM3"), "built with TensorRT 10.9"),
        (GpuEnvironment("10.9.0.34", "8.9", "NVIDIA L4"), "built for compute capability 9.0"),
    ],
)
def test_load_engine_refuses_a_plan_built_elsewhere(
    tmp_path: Path, monkeypatch, env: GpuEnvironment, message: str
) -> None:
    """Through ``load_engine``, with the hardware probe answering as the given machine."""
    import serving.backends.tensorrt as backend

    plan = _plan_version(tmp_path, _metadata())
    probed: list[int] = []

    def probe(device: int) -> GpuEnvironment:
        probed.append(device)
        return env

    monkeypatch.setattr(backend, "probe_environment", probe)
    config = parse_config((plan.parents[1] / "config.pbtxt").read_text())
    with pytest.raises(ModelNotReady, match=message) as info:
        load_engine(plan, config)
    assert "rebuild it here" in str(info.value)
    assert probed == [0]


@pytest.mark.skipif(
    HAS_TRT, reason="tensorrt is installed here; this checks the refusal without it"
)
def test_without_tensorrt_the_plan_is_refused_with_the_reason(tmp_path: Path) -> None:
    plan = _plan_version(tmp_path, _metadata())
    config = parse_config((plan.parents[1] / "config.pbtxt").read_text())
    with pytest.raises(ModelNotReady, match="tensorrt is not importable"):
        TensorRTEngine(plan, config)


@pytest.mark.skipif(
    HAS_TRT, reason="tensorrt is installed here; this checks the refusal without it"
)
def test_server_reports_the_unloadable_plan_and_serves_the_rest(
    tmp_path: Path, start_server
) -> None:
    repo = tmp_path / "repo"
    _plan_version(repo, _metadata())
    write_model(repo, "add_sub", add_sub_model(), model_config={"platform": "onnxruntime_onnx"})
    server = start_server(repo)
    client = server.client()
    try:
        assert client.is_model_ready("add_sub")
        assert not client.is_model_ready("plan_model")
        rows = [m for m in client.get_model_repository_index() if m["name"] == "plan_model"]
        assert rows
        assert rows[0]["state"] == "UNAVAILABLE"
        assert "tensorrt is not importable" in rows[0]["reason"]
    finally:
        client.close()


def _torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_torch_has_cuda(), reason="this machine has CUDA; checks the refusal without")
def test_with_tensorrt_but_no_cuda_device_the_plan_is_refused(tmp_path: Path, monkeypatch) -> None:
    """TensorRT importable (a stand-in module with a version) but torch sees no GPU."""
    import sys
    from types import SimpleNamespace

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.9.0.34"))
    plan = _plan_version(tmp_path, _metadata())
    config = parse_config((plan.parents[1] / "config.pbtxt").read_text())
    with pytest.raises(ModelNotReady, match="no CUDA device is available") as info:
        load_engine(plan, config)
    assert "tensorrt_plan models need an NVIDIA GPU" in str(info.value)


# --- instance placement --------------------------------------------------------------------


def test_instances_are_placed_per_group_round_robin_over_its_gpus() -> None:
    config = parse_config(
        "instance_group { kind: KIND_GPU count: 3 gpus: [ 1, 3 ] }\n"
        "instance_group { kind: KIND_GPU count: 2 gpus: [ 2 ] }"
    )
    assert [instance_device(config, i) for i in range(5)] == [1, 3, 1, 2, 2]
    assert instance_device(config, 5) == 1  # wraps around like the instance count


def test_placement_defaults_to_gpu_0() -> None:
    assert instance_device(parse_config(""), 0) == 0
    assert instance_device(parse_config("instance_group { kind: KIND_GPU count: 2 }"), 1) == 0
    assert instance_device(parse_config("instance_group { kind: KIND_AUTO }"), 0) == 0


def test_cpu_instance_group_is_refused_for_a_plan() -> None:
    config = parse_config(
        "instance_group { kind: KIND_GPU count: 1 }\ninstance_group { name: 'c' kind: KIND_CPU }"
    )
    assert instance_device(config, 0) == 0
    with pytest.raises(RepositoryError, match="kind KIND_CPU; a tensorrt_plan runs only on GPUs"):
        instance_device(config, 1)


# --- profiles and buffers ------------------------------------------------------------------


def test_profile_selection_picks_the_first_profile_that_fits() -> None:
    small = {"x": ((1, 4), (4, 4), (8, 4))}
    large = {"x": ((9, 4), (32, 4), (64, 4))}
    assert select_profile([small, large], {"x": (1, 4)}) == 0
    assert select_profile([small, large], {"x": (8, 4)}) == 0
    assert select_profile([small, large], {"x": (9, 4)}) == 1
    assert select_profile([BERT_PROFILE], {"input_ids": (32, 512), "attention_mask": (3, 7)}) == 0


@pytest.mark.parametrize(
    "shapes",
    [
        {"input_ids": (33, 128), "attention_mask": (33, 128)},  # batch too large
        {"input_ids": (8, 513), "attention_mask": (8, 128)},  # sequence too long
        {"input_ids": (8,), "attention_mask": (8, 128)},  # wrong rank
    ],
)
def test_shapes_outside_every_profile_are_invalid_input(shapes) -> None:
    with pytest.raises(InvalidInput, match=r"outside every optimization profile") as info:
        select_profile([BERT_PROFILE], shapes)
    assert "input_ids: [1, 1]..[32, 512]" in str(info.value)


def test_buffers_are_sized_for_the_largest_shape_of_any_profile() -> None:
    profiles = [
        {"x": ((1, 1), (4, 64), (8, 128))},
        {"x": ((1, 1), (16, 16), (64, 32))},
    ]
    assert max_input_shapes(profiles) == {"x": (64, 128)}
    assert buffer_bytes((8, 128), "FP16") == 8 * 128 * 2
    assert buffer_bytes((8, 128, 384), "FP32") == 8 * 128 * 384 * 4
    assert buffer_bytes((0, 3), "INT64") == 1  # a valid pointer even when empty
    assert buffer_bytes((), "BOOL") == 1
    specs = [TensorSpec("x", "INT64", (-1, -1)), TensorSpec("y", "FP32", (-1, -1, 8))]
    per_profile = [{"x": (8, 128), "y": (8, 128, 8)}, {"x": (64, 32), "y": (64, 32, 8)}]
    assert max_buffer_sizes(specs, per_profile) == {
        "x": 64 * 32 * 8,
        "y": 64 * 32 * 8 * 4,
    }


def test_unresolved_dynamic_output_shapes_are_refused() -> None:
    with pytest.raises(RepositoryError, match="output allocator"):
        buffer_bytes((-1, 4), "FP32")
    with pytest.raises(RepositoryError, match="rank of input 'x'"):
        max_input_shapes([{"x": ((1,), (1,), (2,))}, {"x": ((1, 1), (1, 1), (2, 2))}])


# --- on a GPU with TensorRT ----------------------------------------------------------------


def _gpu_skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "needs TensorRT (the 'gpu' extra) and an NVIDIA GPU: tensorrt is not installed"
    import torch

    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU: torch.cuda.is_available() is False"
    return None


GPU_SKIP = _gpu_skip_reason()


def _tiny_onnx(path: Path, fp16: bool = False) -> Path:
    """x [batch, 4] -> y = relu(x @ W + b) [batch, 3], z = sum(y) [batch, 1]."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
            helper.make_node("ReduceSum", ["y", "axes"], ["z"], keepdims=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 1]),
        ],
        initializer=[
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(model, str(path))
    return path


def _built_version(root: Path, fp16: bool = False) -> tuple[Path, Path]:
    from optimizers.engine_build.tensorrt import build_engine

    onnx_path = _tiny_onnx(root / "tiny.onnx", fp16)
    version = root / "tiny" / "1"
    profile = {"x": ((1, 4), (4, 4), (16, 4))}
    plan = build_engine(onnx_path, version, profiles=[profile], workspace_bytes=1 << 26)
    return onnx_path, plan


GPU_CONFIG = (
    'platform: "tensorrt_plan"\nmax_batch_size: 16\n'
    "instance_group { kind: KIND_GPU count: 1 gpus: [ 0 ] }"
)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-weights"])
def test_served_plan_matches_onnxruntime(tmp_path: Path, fp16: bool) -> None:
    onnx_path, plan = _built_version(tmp_path, fp16)
    engine = load_engine(plan, parse_config(GPU_CONFIG))
    try:
        assert [(s.name, s.datatype, s.shape) for s in engine.inputs] == [("x", "FP32", (-1, 4))]
        assert {s.name for s in engine.outputs} == {"y", "z"}
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        tolerance = 2e-2 if fp16 else 1e-4
        for batch in (1, 5, 16, 3):  # grows, shrinks: buffers are reused
            x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
            expected = dict(zip(["y", "z"], session.run(["y", "z"], {"x": x}), strict=True))
            got = engine.infer({"x": x})
            for name in ("y", "z"):
                assert got[name].shape == expected[name].shape
                np.testing.assert_allclose(
                    got[name], expected[name], rtol=tolerance, atol=tolerance
                )
        assert set(engine.infer({"x": x}, ["z"])) == {"z"}
        with pytest.raises(InvalidInput, match="outside every optimization profile"):
            engine.infer({"x": np.zeros((17, 4), np.float32)})
        with pytest.raises(InvalidInput, match="the engine takes FP32"):
            engine.infer({"x": np.zeros((2, 4), np.float64)})
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
def test_real_plan_with_an_edited_sidecar_is_refused(tmp_path: Path) -> None:
    _onnx, plan = _built_version(tmp_path)
    data = json.loads(metadata_path(plan).read_text())
    import tensorrt

    assert data["tensorrt_version"] == tensorrt.__version__
    data["compute_capability"] = "1.0"
    metadata_path(plan).write_text(json.dumps(data))
    with pytest.raises(ModelNotReady, match=r"built for compute capability 1\.0"):
        load_engine(plan, parse_config(GPU_CONFIG))
