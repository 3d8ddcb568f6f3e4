"""config.pbtxt through the real Triton protobuf schema, JSON form, and ONNX auto-complete."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from serving.datatypes import CONFIG_TO_V2, ONNX_TO_V2, V2_TO_CONFIG
from serving.errors import RepositoryError
from serving.model_config import (
    autocomplete_from_onnx,
    config_from_json,
    config_to_json,
    format_config,
    parse_config,
    read_config,
    v2_of,
    write_config,
)

# A config in the style of Triton's model_configuration.md examples, using every section
# the server reads.
TRITON_EXAMPLE = """
name: "densenet_onnx"
platform: "onnxruntime_onnx"
max_batch_size: 16
version_policy: { latest: { num_versions: 2 } }
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape: { shape: [ 1, 3, 224, 224 ] }
  }
]
output [
  {
    name: "fc6_1"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    reshape: { shape: [ 1, 1000, 1, 1 ] }
    label_filename: "densenet_labels.txt"
  }
]
instance_group [
  { count: 2 kind: KIND_CPU },
  { count: 1 kind: KIND_GPU gpus: [ 0, 1 ] }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 50000 }
}
optimization { execution_accelerators {
  gpu_execution_accelerator : [ {
    name : "tensorrt"
    parameters { key: "precision_mode" value: "FP16" }
    parameters { key: "max_workspace_size_bytes" value: "1073741824" }
  } ]
}}
model_warmup [
  {
    name: "zeros"
    batch_size: 4
    inputs { key: "data_0" value: { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] zero_data: true } }
  }
]
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
parameters { key: "cudnn_conv_algo_search" value: { string_value: "HEURISTIC" } }
"""


def test_triton_example_parses_into_the_schema() -> None:
    config = parse_config(TRITON_EXAMPLE)
    assert config.name == "densenet_onnx"
    assert config.max_batch_size == 16
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 2
    assert list(config.input[0].dims) == [3, 224, 224]
    assert config.input[0].format == mc.ModelInput.FORMAT_NCHW
    assert list(config.output[0].reshape.shape) == [1, 1000, 1, 1]
    assert [g.kind for g in config.instance_group] == [
        mc.ModelInstanceGroup.KIND_CPU,
        mc.ModelInstanceGroup.KIND_GPU,
    ]
    assert list(config.instance_group[1].gpus) == [0, 1]
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 8]
    assert batching.max_queue_delay_microseconds == 100
    assert batching.default_queue_policy.timeout_action == mc.ModelQueuePolicy.REJECT
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt"
    assert accel.parameters["precision_mode"] == "FP16"
    warmup = config.model_warmup[0]
    assert warmup.batch_size == 4
    assert warmup.inputs["data_0"].zero_data
    assert config.parameters["intra_op_thread_count"].string_value == "2"


def test_pbtxt_round_trip_is_lossless() -> None:
    first = parse_config(TRITON_EXAMPLE)
    text = format_config(first)
    second = parse_config(text)
    assert second == first
    assert format_config(second) == text


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    config = parse_config(TRITON_EXAMPLE)
    path = write_config(tmp_path, config)
    assert path == tmp_path / "config.pbtxt"
    assert read_config(tmp_path) == config
    # the atomic write leaves no temp file behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.pbtxt"]


def test_read_config_of_folder_without_one_is_empty(tmp_path: Path) -> None:
    assert read_config(tmp_path) == mc.ModelConfig()


def test_syntax_error_names_the_file_and_line() -> None:
    with pytest.raises(RepositoryError, match=r"my/config.pbtxt: 3:1") as info:
        parse_config('name: "x"\nmax_batch_size: 4\nnot_a_field: 1\n', source="my/config.pbtxt")
    assert "not_a_field" in str(info.value)
    assert info.value.status_code == 400


def test_wrong_value_type_is_rejected() -> None:
    with pytest.raises(RepositoryError, match="max_batch_size"):
        parse_config('max_batch_size: "lots"')


def test_json_round_trip_matches_text_form() -> None:
    config = parse_config(TRITON_EXAMPLE)
    as_json = config_to_json(config)
    # Triton's JSON uses proto field names and enum names
    assert as_json["max_batch_size"] == 16
    assert as_json["input"][0]["data_type"] == "TYPE_FP32"
    assert as_json["input"][0]["dims"] == ["3", "224", "224"]  # int64 as strings, as in Triton
    assert as_json["instance_group"][1]["kind"] == "KIND_GPU"
    assert config_from_json(as_json) == config


def test_config_from_json_string_as_triton_load_request_sends_it() -> None:
    text = (
        '{"name": "m", "platform": "onnxruntime_onnx", "max_batch_size": 8,'
        ' "input": [{"name": "x", "data_type": "TYPE_INT64", "dims": [-1]}],'
        ' "dynamic_batching": {"max_queue_delay_microseconds": 200}}'
    )
    config = config_from_json(text)
    assert config.input[0].data_type == mc.TYPE_INT64
    assert list(config.input[0].dims) == [-1]
    assert config.dynamic_batching.max_queue_delay_microseconds == 200


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"max_batch_size": 4, "no_such_field": 1}', "no_such_field"),
        ('{"input": [{"name": "x", "data_type": "TYPE_NOPE"}]}', "TYPE_NOPE"),
        ('{"max_batch_size": "many"}', "max_batch_size"),
    ],
)
def test_config_from_json_rejects_bad_payloads(payload: str, message: str) -> None:
    with pytest.raises(RepositoryError, match=message):
        config_from_json(payload)


def test_v2_of_every_config_datatype() -> None:
    for config_name, v2 in CONFIG_TO_V2.items():
        assert v2_of(mc.DataType.Value(config_name)) == v2
    assert v2_of(mc.TYPE_STRING) == "BYTES"


# -- auto-complete from ONNX ------------------------------------------------------------


def _onnx_file(
    path: Path,
    inputs: list[tuple[str, int, list[int | str]]],
    outputs: list[tuple[str, int, list[int | str]]],
) -> Path:
    """An Identity-per-pair ONNX model with the given (name, element type, shape) I/O."""
    nodes = [
        helper.make_node("Identity", [i[0]], [o[0]]) for i, o in zip(inputs, outputs, strict=True)
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(*spec) for spec in inputs],
        [helper.make_tensor_value_info(*spec) for spec in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_autocomplete_fills_an_empty_config_with_dynamic_batch(tmp_path: Path) -> None:
    model = _onnx_file(
        tmp_path / "m.onnx",
        [("x", TensorProto.FLOAT, ["batch", 3, "seq"])],
        [("y", TensorProto.FLOAT, ["batch", 3, "seq"])],
    )
    config = autocomplete_from_onnx(mc.ModelConfig(), model, name="auto")
    assert config.name == "auto"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size > 0
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("x", mc.TYPE_FP32, [3, -1])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("y", mc.TYPE_FP32, [3, -1])
    ]


def test_autocomplete_fixed_batch_keeps_full_dims(tmp_path: Path) -> None:
    model = _onnx_file(
        tmp_path / "m.onnx",
        [("x", TensorProto.FLOAT, [1, 4])],
        [("y", TensorProto.FLOAT, [1, 4])],
    )
    config = autocomplete_from_onnx(mc.ModelConfig(), model, name="fixed")
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [1, 4]
    assert list(config.output[0].dims) == [1, 4]


def test_autocomplete_mixed_batch_dims_does_not_batch(tmp_path: Path) -> None:
    model = _onnx_file(
        tmp_path / "m.onnx",
        [("a", TensorProto.FLOAT, ["n", 2]), ("b", TensorProto.FLOAT, [2, 2])],
        [("c", TensorProto.FLOAT, ["n", 2]), ("d", TensorProto.FLOAT, [2, 2])],
    )
    config = autocomplete_from_onnx(mc.ModelConfig(), model, name="mixed")
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [-1, 2]


def test_autocomplete_keeps_what_a_partial_config_sets(tmp_path: Path) -> None:
    model = _onnx_file(
        tmp_path / "m.onnx",
        [("x", TensorProto.FLOAT, ["batch", 8]), ("mask", TensorProto.INT64, ["batch", 8])],
        [("y", TensorProto.FLOAT, ["batch", 8]), ("z", TensorProto.INT64, ["batch", 8])],
    )
    partial = parse_config(
        """
        max_batch_size: 4
        input { name: "x" data_type: TYPE_FP32 dims: [ 8 ] }
        dynamic_batching { max_queue_delay_microseconds: 300 }
        """
    )
    config = autocomplete_from_onnx(partial, model, name="partial")
    assert config.max_batch_size == 4
    assert config.dynamic_batching.max_queue_delay_microseconds == 300
    by_name = {t.name: t for t in config.input}
    assert list(by_name) == ["x", "mask"]
    assert by_name["mask"].data_type == mc.TYPE_INT64
    assert list(by_name["mask"].dims) == [8]
    assert [(t.name, list(t.dims)) for t in config.output] == [("y", [8]), ("z", [8])]
    # the original message is not modified
    assert len(partial.input) == 1
    assert not partial.output


def test_autocomplete_does_not_batch_when_config_disables_it(tmp_path: Path) -> None:
    model = _onnx_file(
        tmp_path / "m.onnx",
        [("x", TensorProto.FLOAT, ["batch", 2])],
        [("y", TensorProto.FLOAT, ["batch", 2])],
    )
    partial = parse_config('input { name: "x" data_type: TYPE_FP32 dims: [ -1, 2 ] }')
    config = autocomplete_from_onnx(partial, model, name="nobatch")
    assert config.max_batch_size == 0
    assert list(config.output[0].dims) == [-1, 2]


def test_autocomplete_ignores_initializers_listed_as_inputs(tmp_path: Path) -> None:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    config = autocomplete_from_onnx(mc.ModelConfig(), tmp_path / "m.onnx", name="init")
    assert [t.name for t in config.input] == ["x"]
    assert config.max_batch_size > 0


@pytest.mark.parametrize("onnx_type", sorted(ONNX_TO_V2))
def test_autocomplete_maps_every_onnx_dtype(tmp_path: Path, onnx_type: int) -> None:
    model = _onnx_file(
        tmp_path / "m.onnx", [("x", onnx_type, ["batch", 2])], [("y", onnx_type, ["batch", 2])]
    )
    config = autocomplete_from_onnx(mc.ModelConfig(), model, name="types")
    expected = mc.DataType.Value(V2_TO_CONFIG[ONNX_TO_V2[onnx_type]])
    assert config.input[0].data_type == expected
    assert config.output[0].data_type == expected
    assert v2_of(config.input[0].data_type) == ONNX_TO_V2[onnx_type]


def test_autocomplete_rejects_dtypes_v2_cannot_carry(tmp_path: Path) -> None:
    model = _onnx_file(
        tmp_path / "m.onnx",
        [("x", TensorProto.COMPLEX64, ["batch", 2])],
        [("y", TensorProto.COMPLEX64, ["batch", 2])],
    )
    with pytest.raises(RepositoryError, match=r"'x' has ONNX element type 14"):
        autocomplete_from_onnx(mc.ModelConfig(), model, name="complex")


def test_autocomplete_of_shipped_demo_model_matches_its_config() -> None:
    folder = Path(__file__).resolve().parents[2] / "model_repository" / "digits_cnn"
    written = read_config(folder)
    bare = autocomplete_from_onnx(mc.ModelConfig(), folder / "1" / "model.onnx", name="digits_cnn")
    assert [(t.name, t.data_type, list(t.dims)) for t in bare.input] == [
        (t.name, t.data_type, list(t.dims)) for t in written.input
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in bare.output] == [
        (t.name, t.data_type, list(t.dims)) for t in written.output
    ]
