"""ONNX Runtime engine: every v2 datatype end to end, errors, execution-provider selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from serving.backends import Engine, load_engine
from serving.backends.onnxruntime import (
    OnnxRuntimeEngine,
    gpu_device_id,
    provider_chain,
    session_options,
    wants_gpu,
)
from serving.datatypes import (
    NUMPY_TO_V2,
    ONNX_TO_V2,
    ORT_TO_V2,
    V2_TO_CONFIG,
    V2_TO_NUMPY,
    element_size,
    numpy_dtype,
    v2_datatype,
)
from serving.errors import InvalidInput, ModelNotReady, RepositoryError
from serving.model_config import parse_config
from serving.repository import ModelRepository

PROJECT = Path(__file__).resolve().parents[2]
DEMO = PROJECT / "model_repository"
V2_TO_ONNX = {v2: onnx_type for onnx_type, v2 in ONNX_TO_V2.items()}
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _identity_repo(root: Path, datatype: str) -> ModelRepository:
    """A repository with one model ``ident`` (Identity x -> y, [batch, 3]) of ``datatype``."""
    elem = V2_TO_ONNX[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem, ["batch", 3])],
        [helper.make_tensor_value_info("y", elem, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "ident" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "ident" / "1" / "model.onnx"))
    return ModelRepository(root)


def _sample(datatype: str) -> np.ndarray:
    """A [2, 3] array with values that exercise the type's range."""
    if datatype == "BYTES":
        items = [b"plain", "ünïcödé ✓".encode(), b"", b"with\x00nul", b"z" * 300, b"tab\tnl\n"]
        array = np.empty(6, dtype=object)
        array[:] = items
        return array.reshape(2, 3)
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if dtype.kind == "f":
        info = np.finfo(dtype)
        return np.array([[0.5, -1.25, info.max], [info.tiny, -0.0, 3.0]], dtype=dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=dtype)


@pytest.mark.parametrize("datatype", sorted(V2_TO_NUMPY))
def test_every_v2_datatype_round_trips_through_the_engine(tmp_path: Path, datatype: str) -> None:
    entry = _identity_repo(tmp_path, datatype).entry("ident")
    assert entry.ok, entry.error
    expected_config_type = mc.DataType.Value(V2_TO_CONFIG[datatype])
    assert entry.config.input[0].data_type == expected_config_type
    assert entry.config.max_batch_size > 0
    engine = load_engine(entry.versions[0].model_file, entry.config)
    try:
        assert isinstance(engine, Engine)
        assert engine.device == "cpu"
        assert engine.inputs[0].datatype == datatype
        assert engine.inputs[0].shape == (-1, 3)
        assert engine.outputs[0].datatype == datatype
        sample = _sample(datatype)
        out = engine.infer({"x": sample})["y"]
        assert out.dtype == V2_TO_NUMPY[datatype]
        assert out.shape == sample.shape
        if datatype == "BYTES":
            assert all(isinstance(item, bytes) for item in out.reshape(-1))
            assert out.tolist() == sample.tolist()
        else:
            np.testing.assert_array_equal(out, sample)
            assert v2_datatype(out.dtype) == datatype
    finally:
        engine.close()


def test_bytes_input_accepts_str_arrays_and_rejects_non_utf8(tmp_path: Path) -> None:
    entry = _identity_repo(tmp_path, "BYTES").entry("ident")
    engine = load_engine(entry.versions[0].model_file, entry.config)
    out = engine.infer({"x": np.array([["a", "bé", "c"]])})["y"]
    assert out.tolist() == [[b"a", "bé".encode(), b"c"]]
    bad = np.empty((1, 3), dtype=object)
    bad[0] = [b"ok", b"\xff\xfe", b"ok"]
    with pytest.raises(InvalidInput, match=r"input 'x': BYTES element 1 is not UTF-8"):
        engine.infer({"x": bad})


def _demo_engine(name: str) -> tuple[OnnxRuntimeEngine, Path]:
    entry = ModelRepository(DEMO).entry(name)
    assert entry.ok, entry.error
    model_file = entry.versions[0].model_file
    return load_engine(model_file, entry.config), model_file


def test_digits_engine_matches_onnxruntime_run_directly() -> None:
    data = np.load(PROJECT / "bench" / "data" / "digits_test.npz")
    engine, model_file = _demo_engine("digits_cnn")
    assert [(s.name, s.datatype, s.shape) for s in engine.inputs] == [
        ("input", "FP32", (-1, 1, 8, 8))
    ]
    assert [(s.name, s.datatype, s.shape) for s in engine.outputs] == [("logits", "FP32", (-1, 10))]
    logits = engine.infer({"input": data["x"]})["logits"]
    direct = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(logits, direct.run(None, {"input": data["x"]})[0], rtol=0, atol=0)
    accuracy = float((logits.argmax(axis=1) == data["y"]).mean())
    assert accuracy > 0.95  # the shipped model was trained to ~98.6% on this held-out split
    one = engine.infer({"input": data["x"][:1]})["logits"]
    np.testing.assert_allclose(one, logits[:1], rtol=1e-5, atol=1e-5)


def test_wine_engine_returns_int64_and_bytes_outputs() -> None:
    data = np.load(PROJECT / "bench" / "data" / "wine_test.npz")
    engine, _ = _demo_engine("wine_mlp")
    out = engine.infer({"features": data["x"]})
    assert out["probabilities"].shape == (len(data["y"]), 3)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert out["class_id"].dtype == np.int64
    np.testing.assert_array_equal(out["class_id"][:, 0], out["probabilities"].argmax(axis=1))
    assert out["label"].tolist() == [[f"class_{i}".encode()] for i in out["class_id"][:, 0]]
    assert float((out["class_id"][:, 0] == data["y"]).mean()) > 0.9
    only = engine.infer({"features": data["x"][:2]}, output_names=["label"])
    assert list(only) == ["label"]


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({"input": np.zeros((1, 1, 8, 8), np.float64)}, "Unexpected input data type"),
        ({"input": np.zeros((1, 1, 9, 8), np.float32)}, "invalid dimensions"),
        ({}, "missing from input feed"),
        (
            {"input": np.zeros((1, 1, 8, 8), np.float32), "extra": np.zeros(1, np.float32)},
            "Invalid input name",
        ),
    ],
)
def test_client_mistakes_are_invalid_input(feed: dict[str, np.ndarray], message: str) -> None:
    engine, _ = _demo_engine("digits_cnn")
    with pytest.raises(InvalidInput, match=message) as info:
        engine.infer(feed)
    assert info.value.status_code == 400


def test_unknown_output_name_is_invalid_input() -> None:
    engine, _ = _demo_engine("digits_cnn")
    with pytest.raises(InvalidInput, match="nope"):
        engine.infer({"input": np.zeros((1, 1, 8, 8), np.float32)}, output_names=["nope"])


def test_corrupt_model_file_is_a_repository_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not an onnx model" * 20)
    config = parse_config('platform: "onnxruntime_onnx"')
    with pytest.raises(RepositoryError, match=r"onnxruntime could not load model\.onnx"):
        load_engine(tmp_path / "model.onnx", config)


def test_unknown_platform_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="platform 'pytorch_libtorch' is not supported"):
        load_engine(tmp_path / "model.pt", parse_config('platform: "pytorch_libtorch"'))


# -- execution providers -------------------------------------------------------------------


def test_cpu_config_uses_only_the_cpu_provider(tmp_path: Path) -> None:
    config = parse_config("instance_group { kind: KIND_CPU count: 2 }")
    assert not wants_gpu(config)
    assert provider_chain(config, tmp_path) == [("CPUExecutionProvider", {})]
    assert provider_chain(mc.ModelConfig(), tmp_path) == [("CPUExecutionProvider", {})]


def test_gpu_config_gets_cuda_with_exhaustive_conv_search(tmp_path: Path) -> None:
    config = parse_config("instance_group { kind: KIND_GPU count: 1 }")
    assert wants_gpu(config)
    chain = provider_chain(config, tmp_path)
    assert [name for name, _ in chain] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert chain[0][1] == {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}


def test_gpu_instances_round_robin_over_listed_gpus(tmp_path: Path) -> None:
    config = parse_config(
        "instance_group { kind: KIND_CPU count: 1 }\n"
        "instance_group { kind: KIND_GPU count: 3 gpus: [ 1, 3 ] }"
    )
    assert [gpu_device_id(config, i) for i in range(4)] == [1, 3, 1, 3]
    assert provider_chain(config, tmp_path, instance_index=1)[0][1]["device_id"] == "3"


def test_cudnn_conv_algo_search_parameter_overrides_the_default(tmp_path: Path) -> None:
    config = parse_config(
        "instance_group { kind: KIND_GPU }\n"
        'parameters { key: "cudnn_conv_algo_search" value: { string_value: "HEURISTIC" } }'
    )
    cuda = dict(provider_chain(config, tmp_path))["CUDAExecutionProvider"]
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"


@pytest.mark.parametrize(
    ("precision", "fp16", "int8"),
    [("FP16", "True", "False"), ("INT8", "False", "True"), ("FP32", "False", "False")],
)
def test_tensorrt_accelerator_options(tmp_path: Path, precision: str, fp16: str, int8: str) -> None:
    config = parse_config(
        f"""
        instance_group {{ kind: KIND_GPU gpus: [ 2 ] }}
        optimization {{ execution_accelerators {{ gpu_execution_accelerator : [ {{
          name : "tensorrt"
          parameters {{ key: "precision_mode" value: "{precision}" }}
          parameters {{ key: "max_workspace_size_bytes" value: "1073741824" }}
          parameters {{ key: "trt_builder_optimization_level" value: "5" }}
        }} ] }} }}
        """
    )
    chain = provider_chain(config, tmp_path / "1")
    assert [name for name, _ in chain] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    trt = chain[0][1]
    assert trt["device_id"] == "2"
    assert trt["trt_fp16_enable"] == fp16
    assert trt["trt_int8_enable"] == int8
    assert trt["trt_max_workspace_size"] == "1073741824"
    assert trt["trt_builder_optimization_level"] == "5"
    assert trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == str(tmp_path / "1" / "trt_cache")
    assert "precision_mode" not in trt
    assert chain[1][1]["device_id"] == "2"


def test_session_options_from_config_parameters() -> None:
    config = parse_config(
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
        'parameters { key: "inter_op_thread_count" value: { string_value: "2" } }\n'
        'parameters { key: "graph_optimization_level" value: { string_value: "ORT_ENABLE_BASIC" } }'
    )
    options = session_options(config)
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def test_session_options_spinning_default_and_ort_config_keys() -> None:
    """Spinning is off unless asked for; ``session.*`` parameters reach onnxruntime as is."""
    options = session_options(parse_config(""))
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    config = parse_config(
        'parameters { key: "allow_spinning" value: { string_value: "1" } }\n'
        'parameters { key: "session.force_spinning_stop" value: { string_value: "1" } }\n'
        'parameters { key: "session.intra_op.spin_duration_us" value: { string_value: "50" } }'
    )
    options = session_options(config)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.get_session_config_entry("session.intra_op.spin_duration_us") == "50"


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA; the CPU-only refusal cannot occur")
def test_gpu_config_on_cpu_only_onnxruntime_is_not_ready() -> None:
    entry = ModelRepository(DEMO).entry("digits_cnn")
    config = mc.ModelConfig()
    config.CopyFrom(entry.config)
    del config.instance_group[:]
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    with pytest.raises(ModelNotReady, match="no CUDAExecutionProvider") as info:
        load_engine(entry.versions[0].model_file, config)
    assert "KIND_CPU" in str(info.value)
    assert info.value.status_code == 503


@pytest.mark.gpu
def test_digits_on_cuda_matches_cpu() -> None:
    if not HAS_CUDA:
        pytest.skip(
            "CUDAExecutionProvider is not available in this onnxruntime "
            f"(providers: {ort.get_available_providers()}); install the 'gpu' extra on a CUDA host"
        )
    data = np.load(PROJECT / "bench" / "data" / "digits_test.npz")
    entry = ModelRepository(DEMO).entry("digits_cnn")
    cpu = load_engine(entry.versions[0].model_file, entry.config)
    config = mc.ModelConfig()
    config.CopyFrom(entry.config)
    del config.instance_group[:]
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    gpu = load_engine(entry.versions[0].model_file, config)
    assert gpu.device == "gpu"
    assert "CUDAExecutionProvider" in gpu.providers
    expected = cpu.infer({"input": data["x"]})["logits"]
    # by default cuDNN/cuBLAS may use TF32 (10-bit mantissa) on Ampere and newer: logits
    # agree to ~1e-3 of their scale and the predicted classes are the same
    got = gpu.infer({"input": data["x"]})["logits"]
    assert np.abs(got - expected).max() <= 2e-3 * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.999
    # use_tf32 "0": full FP32 math, the same numbers as the CPU to float rounding
    config.parameters["use_tf32"].string_value = "0"
    exact = load_engine(entry.versions[0].model_file, config)
    np.testing.assert_allclose(
        exact.infer({"input": data["x"]})["logits"], expected, rtol=1e-4, atol=1e-4
    )


# -- datatype tables -------------------------------------------------------------------------


def test_datatype_tables_agree_with_onnx_and_numpy() -> None:
    for onnx_type, v2 in ONNX_TO_V2.items():
        if v2 == "BYTES":
            assert onnx_type == TensorProto.STRING
            continue
        assert np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type)) == V2_TO_NUMPY[v2]
    assert set(ONNX_TO_V2.values()) == set(V2_TO_NUMPY)
    assert set(ORT_TO_V2.values()) == set(V2_TO_NUMPY)
    assert set(V2_TO_CONFIG) == set(V2_TO_NUMPY)
    assert V2_TO_CONFIG["BYTES"] == "TYPE_STRING"
    for v2, config_name in V2_TO_CONFIG.items():
        assert mc.DataType.Name(mc.DataType.Value(config_name)) == config_name, v2
    assert all(NUMPY_TO_V2[dtype] == v2 for v2, dtype in V2_TO_NUMPY.items())


def test_datatype_helpers() -> None:
    assert numpy_dtype("FP16") == np.float16
    with pytest.raises(InvalidInput, match="unknown datatype 'FLOAT32'; expected one of BOOL"):
        numpy_dtype("FLOAT32")
    assert v2_datatype(np.dtype("U5")) == "BYTES"
    assert v2_datatype(np.dtype("S3")) == "BYTES"
    assert v2_datatype(np.dtype(object)) == "BYTES"
    with pytest.raises(InvalidInput, match="complex64"):
        v2_datatype(np.dtype(np.complex64))
    assert element_size("BYTES") is None
    assert [element_size(t) for t in ("BOOL", "INT16", "FP32", "UINT64")] == [1, 2, 4, 8]
