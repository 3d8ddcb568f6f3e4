"""TensorRT build step: profiles, parser messages, metadata, the ``tensorrt_build`` pass.

The GPU section builds real engines and skips (with the reason) without TensorRT and a GPU.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizers.chains import build_chains
from optimizers.engine_build.tensorrt import (
    EngineBuildError,
    _check_profiles,
    build_engine,
    network_flags,
    parser_error_text,
    profiles_for,
)
from optimizers.onnxutil import graph_io
from optimizers.passes.base import Artifact, PassContext, PassNotApplicable
from optimizers.registry import available_passes, get_pass
from serving.backends.base import TensorSpec
from serving.backends.tensorrt import metadata_path, read_metadata
from serving.errors import InvalidInput, ModelNotReady

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
BERT_INPUTS = [("input_ids", [-1, -1]), ("attention_mask", [-1, -1]), ("token_type_ids", [-1, -1])]


def _tiny_onnx(path: Path, *, dims: list) -> Path:
    """x -> relu(x @ W) with input dims ``dims`` (strings for dynamic); W is [8, 3]."""
    weight = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims[:-1], 3])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


# --- profiles ------------------------------------------------------------------------------


def test_transformer_inputs_get_batch_and_sequence_ranges() -> None:
    profile = profiles_for(BERT_INPUTS, batch_size=8, max_batch=32, seq_len=128, max_seq=512)
    assert list(profile) == ["input_ids", "attention_mask", "token_type_ids"]
    for shapes in profile.values():
        assert shapes == ((1, 1), (8, 128), (32, 512))


def test_static_dims_stay_fixed_and_batch_is_dynamic() -> None:
    profile = profiles_for([("image", [-1, 3, 224, 224])], 4, 16, 128, 512)
    assert profile == {"image": ((1, 3, 224, 224), (4, 3, 224, 224), (16, 3, 224, 224))}
    fixed = profiles_for([("x", [2, 8])], 1, 1, 1, 1)
    assert fixed == {"x": ((2, 8), (2, 8), (2, 8))}


def test_profiles_from_a_real_graph(tmp_path: Path) -> None:
    specs, _ = graph_io(_tiny_onnx(tmp_path / "m.onnx", dims=["batch", "seq", 8]))
    inputs = [(s.name, [d if isinstance(d, int) else -1 for d in s.dims]) for s in specs]
    assert inputs == [("x", [-1, -1, 8])]
    assert profiles_for(inputs, 2, 8, 16, 64) == {"x": ((1, 1, 8), (2, 16, 8), (8, 64, 8))}


@pytest.mark.parametrize(
    ("inputs", "sizes", "message"),
    [
        ([("image", [-1, 3, -1, -1])], (1, 8, 128, 512), "dim 2 is dynamic"),
        (BERT_INPUTS, (16, 8, 128, 512), r"batch_size \(16\) <= max_batch \(8\)"),
        (BERT_INPUTS, (0, 8, 128, 512), r"1 <= batch_size \(0\)"),
        (BERT_INPUTS, (8, 8, 1024, 512), r"seq_len \(1024\) <= max_seq \(512\)"),
    ],
)
def test_bad_profile_requests_are_invalid_input(inputs, sizes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        profiles_for(inputs, *sizes)


def test_profiles_must_cover_every_dynamic_input_and_nothing_else() -> None:
    inputs = [TensorSpec("ids", "INT64", (-1, -1)), TensorSpec("scale", "FP32", (1,))]
    _check_profiles(inputs, [{"ids": ((1, 1), (2, 2), (4, 4))}])  # static input needs none
    with pytest.raises(InvalidInput, match="no shape range for dynamic input 'ids'"):
        _check_profiles(inputs, [{"scale": ((1,), (1,), (1,))}])
    with pytest.raises(InvalidInput, match=r"unknown inputs \['mask'\]"):
        _check_profiles(inputs, [{"ids": ((1, 1), (2, 2), (4, 4)), "mask": ((1,), (1,), (1,))}])
    with pytest.raises(InvalidInput, match="at least one optimization profile"):
        _check_profiles(inputs, [])


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        (((1,), (2,), (4,)), "every shape needs rank 2"),
        (((1, 8), (4, 8), (2, 8)), r"dim 0 needs 0 <= min <= opt <= max, got 1/4/2"),
        (((1, 8), (2, 8), (4, 16)), "dim 1 is fixed at 8, got 8/8/16"),
    ],
)
def test_profile_ranges_must_fit_the_input(bounds, message: str) -> None:
    inputs = [TensorSpec("x", "FP32", (-1, 8))]
    _check_profiles(inputs, [{"x": ((1, 8), (2, 8), (4, 8))}])
    with pytest.raises(InvalidInput, match=message):
        _check_profiles(inputs, [{"x": bounds}])


# --- TensorRT API glue that needs no GPU ---------------------------------------------------


def test_network_flags_ask_for_strong_typing_when_the_flag_exists() -> None:
    trt10 = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1))
    assert network_flags(trt10, strongly_typed=True) == 1 << 1
    assert network_flags(trt10, strongly_typed=False) == 0
    no_flag = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace())
    assert network_flags(no_flag, strongly_typed=True) == 0


def test_parser_errors_name_the_node_and_operator() -> None:
    class Error:  # the accessors of tensorrt.IParserError
        def desc(self) -> str:
            return "Unsupported operator"

        def node_name(self) -> str:
            return "/encoder/Foo_3"

        def node_operator(self) -> str:
            return "Foo"

    assert parser_error_text(Error()) == "node /encoder/Foo_3 (Foo): Unsupported operator"
    assert parser_error_text("plain message") == "plain message"


# --- the pass ------------------------------------------------------------------------------


def test_pass_is_registered_for_tensorrt_only() -> None:
    passes = available_passes()
    assert "tensorrt_build" in passes
    cls = passes["tensorrt_build"]
    assert cls.helps == frozenset({"tensorrt"})
    assert get_pass("tensorrt_build", max_batch=8).config.max_batch == 8
    with pytest.raises(ValueError, match="no option"):
        get_pass("tensorrt_build", fp16=True)
    for target in ("cpu", "cuda"):
        chains, _ = build_chains("generic", target)
        assert all(name != "tensorrt_build" for chain in chains for name, _ in chain)
    chains, _ = build_chains("generic", "tensorrt")  # the tensorrt target's chains end in a build
    assert [("tensorrt_build", {})] in chains


@pytest.mark.skipif(
    HAS_TRT, reason="tensorrt is installed here; this checks the refusal without it"
)
def test_pass_is_not_applicable_without_tensorrt(tmp_path: Path) -> None:
    model = _tiny_onnx(tmp_path / "m.onnx", dims=["batch", 8])
    artifact = Artifact("onnx", "generic", onnx_path=model)
    ctx = PassContext(workdir=tmp_path, target="tensorrt")
    with pytest.raises(PassNotApplicable, match="needs TensorRT and a GPU: tensorrt is not"):
        get_pass("tensorrt_build").run(artifact, ctx)
    assert not (tmp_path / "tensorrt_build").exists()


@pytest.mark.skipif(
    HAS_TRT, reason="tensorrt is installed here; this checks the refusal without it"
)
def test_build_without_tensorrt_names_the_missing_package(tmp_path: Path) -> None:
    model = _tiny_onnx(tmp_path / "m.onnx", dims=["batch", 8])
    with pytest.raises(ModelNotReady, match="tensorrt is not importable"):
        build_engine(model, tmp_path / "out", profiles={"x": ((1, 8), (1, 8), (4, 8))})
    assert not (tmp_path / "out").exists()


# --- on a GPU with TensorRT ----------------------------------------------------------------


def _gpu_skip_reason() -> str | None:
    if not HAS_TRT:
        return "needs TensorRT (the 'gpu' extra) and an NVIDIA GPU: tensorrt is not installed"
    import torch

    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU: torch.cuda.is_available() is False"
    return None


GPU_SKIP = _gpu_skip_reason()
gpu_only = pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")


@pytest.mark.gpu
@pytest.mark.tensorrt
@gpu_only
def test_build_writes_plan_metadata_and_timing_cache(tmp_path: Path) -> None:
    import tensorrt
    import torch

    model = _tiny_onnx(tmp_path / "m.onnx", dims=["batch", "seq", 8])
    profile = profiles_for([("x", [-1, -1, 8])], 2, 8, 16, 64)
    cache = tmp_path / "timing.cache"
    plan = build_engine(model, tmp_path / "out", profiles=profile, timing_cache=cache)
    assert plan == tmp_path / "out" / "model.plan"
    assert plan.stat().st_size > 0
    assert cache.stat().st_size > 0
    metadata = read_metadata(plan)
    major, minor = torch.cuda.get_device_capability(0)
    assert metadata.tensorrt_version == tensorrt.__version__
    assert metadata.compute_capability == f"{major}.{minor}"
    assert metadata.gpu_name == torch.cuda.get_device_name(0)
    assert metadata.profiles == [profile]
    assert metadata.inputs == [TensorSpec("x", "FP32", (-1, -1, 8))]
    assert [s.name for s in metadata.outputs] == ["y"]
    raw = json.loads(metadata_path(plan).read_text())
    assert len(raw["extra"]["onnx_sha256"]) == 64


@pytest.mark.gpu
@pytest.mark.tensorrt
@gpu_only
def test_parser_rejection_reports_the_parsers_messages(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.custom")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    )
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(EngineBuildError, match=r"ONNX parser rejected bad\.onnx: .*NoSuchOp"):
        build_engine(path, tmp_path / "out", profiles=[{}])


@pytest.mark.gpu
@pytest.mark.tensorrt
@gpu_only
def test_pass_builds_a_plan_beside_the_onnx_artifact(tmp_path: Path) -> None:
    model = _tiny_onnx(tmp_path / "m.onnx", dims=["batch", 8])
    artifact = Artifact("onnx", "generic", onnx_path=model)
    ctx = PassContext(workdir=tmp_path / "work", target="tensorrt", batch_size=4, seq_len=16)
    result = get_pass("tensorrt_build", max_batch=16).run(artifact, ctx)
    plan = Path(result.artifact.meta["tensorrt_plan"])
    assert result.artifact.onnx_path == model
    assert result.report["profile"] == {"x": [[1, 8], [4, 8], [16, 8]]}
    assert read_metadata(plan).profiles == [{"x": ((1, 8), (4, 8), (16, 8))}]
    assert (tmp_path / "work" / "timing.cache").is_file()
