"""The KServe v2 codec against tritonclient's own encoder and decoder."""

from __future__ import annotations

import contextlib
import gzip
import json
import struct
import zlib

import numpy as np
import orjson
import pytest
import tritonclient.http as th
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.backends.base import TensorSpec
from serving.errors import InvalidInput, PayloadTooLarge
from serving.protocol import (
    HEADER_LENGTH,
    InferenceRequest,
    InputTensor,
    OutputRequest,
    ProtocolLimits,
    check_inputs,
    compress_body,
    decode_infer_request,
    decompress_body,
    encode_infer_response,
)

LIMITS = ProtocolLimits()
RNG = np.random.default_rng(1234)


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random data covering each type's extremes."""
    n = int(np.prod(shape))
    if datatype == "BOOL":
        return RNG.integers(0, 2, n).astype(bool).reshape(shape)
    if datatype == "BYTES":
        items = [bytes(RNG.integers(0, 256, RNG.integers(0, 7)).astype(np.uint8)) for _ in range(n)]
        out = np.empty(n, dtype=object)
        out[:] = items
        return out.reshape(shape)
    dtype = np.dtype(th.triton_to_np_dtype(datatype))
    if dtype.kind == "f":
        values = RNG.standard_normal(n) * 1000
        values[0] = np.finfo(dtype).max
        values[-1] = np.finfo(dtype).tiny
        return values.astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    values = RNG.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
    values[0], values[-1] = info.min, info.max
    return values.reshape(shape)


NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
NUMERIC += ["FP16", "FP32", "FP64"]
ALL_TYPES = [*NUMERIC, "BYTES"]


def client_request(arrays: dict[str, tuple[str, np.ndarray]], binary: bool, **kwargs):
    inputs = []
    for name, (datatype, array) in arrays.items():
        tensor = th.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return th.InferenceServerClient.generate_request_body(inputs, **kwargs)


def decode(body: bytes, header_length: int | None = None, limits: ProtocolLimits = LIMITS):
    return decode_infer_request(body, header_length=header_length, limits=limits)


def json_body(doc: dict) -> bytes:
    return json.dumps(doc).encode()


# ----------------------------------------------------------------------- round trips


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_decodes_tritonclient_requests_for_every_datatype(datatype, binary):
    array = sample(datatype, (3, 5))
    if datatype == "BYTES" and not binary:  # JSON carries UTF-8 strings
        array = np.array([["héllo", "", "a b"] * 5][0][:15], dtype=object).reshape(3, 5)
    body, header_length = client_request({"in0": (datatype, array)}, binary)
    request = decode(body, header_length)
    (tensor,) = request.inputs
    assert tensor.name == "in0"
    assert tensor.datatype == datatype
    assert tensor.shape == (3, 5)
    assert tensor.data.shape == (3, 5)
    if datatype == "BYTES":
        expected = [x if isinstance(x, bytes) else x.encode() for x in array.reshape(-1)]
        assert tensor.data.reshape(-1).tolist() == expected
    else:
        assert tensor.data.dtype == array.dtype
        np.testing.assert_array_equal(tensor.data, array)


def test_decodes_several_binary_and_json_inputs_in_one_body():
    a = sample("FP32", (2, 3))
    b = sample("BYTES", (4,))
    c = sample("INT64", (2, 1))
    inputs = []
    for name, datatype, array, binary in [
        ("a", "FP32", a, True),
        ("c", "INT64", c, False),
        ("b", "BYTES", b, True),
    ]:
        tensor = th.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    outputs = [th.InferRequestedOutput("y", binary_data=False), th.InferRequestedOutput("z")]
    body, header_length = th.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="req-7", priority=2, timeout=1500
    )
    request = decode(body, header_length)
    got = {t.name: t for t in request.inputs}
    np.testing.assert_array_equal(got["a"].data, a)
    np.testing.assert_array_equal(got["c"].data, c)
    assert got["b"].data.tolist() == b.tolist()
    assert not got["a"].from_json
    assert got["c"].from_json
    assert request.id == "req-7"
    assert request.priority == 2
    assert request.timeout_us == 1500
    assert request.outputs == [OutputRequest("y", False), OutputRequest("z", True)]
    assert not request.binary_data_output


def test_no_outputs_means_all_outputs_in_binary():
    body, header_length = client_request({"x": ("FP32", sample("FP32", (1, 2)))}, True)
    request = decode(body, header_length)
    assert request.outputs is None
    assert request.binary_data_output is True
    assert request.priority == 0
    assert request.timeout_us is None


def roundtrip_response(request: InferenceRequest, outputs: dict[str, np.ndarray]):
    body, headers = encode_infer_response(
        model_name="m", model_version="3", request=request, outputs=outputs
    )
    length = headers.get(HEADER_LENGTH)
    result = th.InferenceServerClient.parse_response_body(
        body, header_length=int(length) if length else None
    )
    return result, headers


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_tritonclient_decodes_responses_for_every_datatype(datatype, binary):
    array = sample(datatype, (2, 3, 2))
    if datatype == "BYTES" and not binary:
        array = np.array(["ünï", "", "x"] * 4, dtype=object).reshape(2, 3, 2)
    request = InferenceRequest(id="abc", inputs=[], outputs=[OutputRequest("out", binary)])
    result, headers = roundtrip_response(request, {"out": array, "unrequested": array})
    got = result.as_numpy("out")
    assert result.get_response()["model_name"] == "m"
    assert result.get_response()["model_version"] == "3"
    assert result.get_response()["id"] == "abc"
    assert result.as_numpy("unrequested") is None
    if binary:
        assert headers["Content-Type"] == "application/octet-stream"
        assert int(headers[HEADER_LENGTH]) > 0
    else:
        assert headers == {"Content-Type": "application/json"}
    if datatype == "BYTES":
        # tritonclient returns JSON strings as str, binary elements as bytes.
        assert got.reshape(-1).tolist() == array.reshape(-1).tolist()
        assert got.shape == array.shape
    else:
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, array)


def test_response_mixes_binary_and_json_outputs_in_request_order():
    y = sample("FP32", (2, 4))
    n = sample("INT64", (2, 1))
    label = np.array(["red", "white"], dtype=object)  # onnxruntime returns str objects
    request = InferenceRequest(
        id=None,
        inputs=[],
        outputs=[OutputRequest("label", True), OutputRequest("y"), OutputRequest("n", True)],
        parameters={"binary_data_output": False},
    )
    result, _ = roundtrip_response(request, {"y": y, "n": n, "label": label})
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label", "y", "n"]
    assert "id" not in result.get_response()
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("n"), n)
    assert result.as_numpy("label").tolist() == [b"red", b"white"]


def test_all_outputs_follow_binary_data_output_parameter():
    y = sample("FP64", (3,))
    request = InferenceRequest(None, [], None, {"binary_data_output": True})
    result, headers = roundtrip_response(request, {"y": y})
    assert result.get_output("y")["parameters"]["binary_data_size"] == 24
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    request = InferenceRequest(None, [], None, {})
    result, headers = roundtrip_response(request, {"y": y})
    assert headers["Content-Type"] == "application/json"
    assert result.get_output("y")["data"] == y.tolist()


@pytest.mark.parametrize("size", [4, 3000])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_float_outputs_survive_json(size, dtype):
    values = RNG.standard_normal(size).astype(dtype)
    values[:3] = [np.nan, np.inf, -np.inf]
    request = InferenceRequest(None, [], [OutputRequest("y", False), OutputRequest("z", False)])
    finite = values[3:].copy()
    result, _ = roundtrip_response(request, {"y": values, "z": finite})
    np.testing.assert_array_equal(result.as_numpy("y"), values)
    np.testing.assert_array_equal(result.as_numpy("z"), finite)


def test_non_finite_floats_survive_json_both_ways():
    values = np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32)
    request = InferenceRequest(None, [], [OutputRequest("y", False)])
    result, _ = roundtrip_response(request, {"y": values})
    np.testing.assert_array_equal(result.as_numpy("y"), values)
    # tritonclient writes NaN/Infinity literals, which strict JSON parsers refuse.
    body, header_length = client_request({"x": ("FP32", values)}, False)
    assert b"NaN" in body
    np.testing.assert_array_equal(decode(body, header_length).inputs[0].data, values)


def test_non_utf8_bytes_output_in_json_asks_for_binary():
    request = InferenceRequest(None, [], [OutputRequest("s", False)])
    with pytest.raises(InvalidInput, match="binary_data"):
        encode_infer_response(
            model_name="m",
            model_version="1",
            request=request,
            outputs={"s": np.array([b"\xff"], dtype=object)},
        )


def test_missing_requested_output_is_named():
    request = InferenceRequest(None, [], [OutputRequest("nope")])
    with pytest.raises(InvalidInput, match="'nope'"):
        encode_infer_response(
            model_name="m", model_version="1", request=request, outputs={"y": np.zeros(1)}
        )


def test_nested_json_data_matching_the_shape_is_accepted():
    doc = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]},
            {"name": "s", "datatype": "BYTES", "shape": [2, 1], "data": [["a"], ["b"]]},
            {"name": "i", "datatype": "UINT64", "shape": [2], "data": [2**64 - 1, 1]},
        ]
    }
    request = decode(json_body(doc))
    np.testing.assert_array_equal(request.inputs[0].data, np.arange(1, 7).reshape(2, 3))
    assert request.inputs[0].data.dtype == np.float32
    assert request.inputs[1].data.tolist() == [[b"a"], [b"b"]]
    assert request.inputs[2].data.tolist() == [2**64 - 1, 1]
    assert request.inputs[2].data.dtype == np.uint64


@pytest.mark.parametrize("size", [4, 300])
def test_float_range_is_checked_for_small_large_and_nested_data(size):
    values = [0.5] * size
    values[-1] = -1e39
    flat = {"inputs": [tensor(datatype="FP32", shape=[size], data=values)]}
    with pytest.raises(InvalidInput, match="-1e\\+39 overflows FP32"):
        decode(json_body(flat))
    half = size // 2
    rows = [values[:half], values[half:]]
    nested = {"inputs": [tensor(datatype="FP32", shape=[2, half], data=rows)]}
    with pytest.raises(InvalidInput, match="overflows FP32"):
        decode(json_body(nested))
    values[-1] = 65504.0  # FP16's largest value fits, one more does not
    assert decode(json_body({"inputs": [tensor(datatype="FP16", shape=[size], data=values)]}))
    values[-1] = 65520.0
    with pytest.raises(InvalidInput, match="overflows FP16"):
        decode(json_body({"inputs": [tensor(datatype="FP16", shape=[size], data=values)]}))
    # non-finite values are allowed in float types, next to large finite ones
    big = [3e38] * (size - 1) + [float("inf")]
    body = json.dumps({"inputs": [tensor(datatype="FP32", shape=[size], data=big)]})
    got = decode(body.encode()).inputs[0].data
    assert np.isinf(got[-1])
    assert got[0] == np.float32(3e38)


def test_empty_tensor():
    doc = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [0, 4], "data": []}]}
    assert decode(json_body(doc)).inputs[0].data.shape == (0, 4)


# -------------------------------------------------------------------- malformed input


def tensor(**overrides) -> dict:
    base = {"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2]}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


BINARY_1 = {"binary_data": 1}
CLASSES_3 = {"classification": 3}
BAD_JSON = [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json_body({}), "'inputs'"),
    (json_body({"inputs": []}), "'inputs'"),
    (json_body({"inputs": [5]}), "JSON object"),
    (json_body({"id": 5, "inputs": [tensor()]}), "'id' must be a string"),
    (json_body({"inputs": [tensor(name=...)]}), "'name'"),
    (json_body({"inputs": [tensor(datatype="FP8")]}), "unknown datatype 'FP8'"),
    (json_body({"inputs": [tensor(shape=...)]}), "'shape'"),
    (json_body({"inputs": [tensor(shape=[-1])]}), "negative dimension"),
    (json_body({"inputs": [tensor(shape=[2.5])]}), "non-integer dimension"),
    (json_body({"inputs": [tensor(shape=[3])]}), "needs 3 elements but data has 2"),
    (json_body({"inputs": [tensor(data=...)]}), "neither 'data' nor binary_data_size"),
    (json_body({"inputs": [tensor(data=5)]}), "must be a list"),
    (json_body({"inputs": [tensor(data=[1, 3.5])]}), "non-integer value 3.5"),
    (json_body({"inputs": [tensor(data=[1, "x"])]}), "non-integer value 'x'"),
    (json_body({"inputs": [tensor(data=[1, None])]}), "non-integer value None"),
    (json_body({"inputs": [tensor(data=[1, 2**31])]}), "does not fit INT32"),
    (json_body({"inputs": [tensor(datatype="UINT8", data=[-1, 2])]}), "does not fit UINT8"),
    (json_body({"inputs": [tensor(datatype="INT64", data=[2**63, -1])]}), "does not fit INT64"),
    (b'{"inputs":[{"name":"x","datatype":"INT32","shape":[2],"data":[1,NaN]}]}', "non-integer"),
    (json_body({"inputs": [tensor(datatype="FP32", data=[1, "x"])]}), "non-numeric"),
    (json_body({"inputs": [tensor(datatype="FP32", data=[1e39, 1])]}), "overflows FP32"),
    (json_body({"inputs": [tensor(datatype="FP16", data=[70000, 1])]}), "overflows FP16"),
    (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[Infinity,-1e39]}]}',
        "value -1e+39 overflows FP32",
    ),
    (json_body({"inputs": [tensor(datatype="BOOL", data=[1, 0])]}), "true/false"),
    (json_body({"inputs": [tensor(datatype="BYTES", data=[1, "a"])]}), "must be strings"),
    (json_body({"inputs": [tensor(shape=[2, 2], data=[[1, 2], [3]])]}), "ragged"),
    (json_body({"inputs": [tensor(shape=[4], data=[[1, 2], [3, 4]])]}), "nested data"),
    (json_body({"inputs": [tensor(shape=[2, 2], data=[[1, 2, 3], [4]])]}), "ragged"),
    (json_body({"inputs": [tensor(shape=[3, 1], data=[[1], [2]])]}), "nested data"),
    (
        json_body({"inputs": [tensor(datatype="BYTES", shape=[2, 1], data=[["a", "b"]])]}),
        "does not match shape",
    ),
    (json_body({"inputs": [tensor(), tensor()]}), "more than once"),
    (json_body({"inputs": [tensor()], "parameters": []}), "'parameters'"),
    (json_body({"inputs": [tensor()], "parameters": {"priority": -1}}), "'priority'"),
    (json_body({"inputs": [tensor()], "parameters": {"timeout": "1s"}}), "'timeout'"),
    (
        json_body({"inputs": [tensor()], "parameters": {"binary_data_output": 1}}),
        "binary_data_output",
    ),
    (json_body({"inputs": [tensor()], "outputs": {"name": "y"}}), "'outputs' must be a list"),
    (json_body({"inputs": [tensor()], "outputs": [{"nom": "y"}]}), "string 'name'"),
    (json_body({"inputs": [tensor()], "outputs": [{"name": "y"}, {"name": "y"}]}), "more than"),
    (
        json_body({"inputs": [tensor()], "outputs": [{"name": "y", "parameters": BINARY_1}]}),
        "'binary_data' must be true or false",
    ),
    (
        json_body({"inputs": [tensor()], "outputs": [{"name": "y", "parameters": CLASSES_3}]}),
        "classification",
    ),
    (
        json_body({"inputs": [tensor(parameters={"shared_memory_region": "r"})]}),
        "shared memory",
    ),
    (
        json_body({"inputs": [tensor(data=..., parameters={"binary_data_size": 8})]}),
        f"no {HEADER_LENGTH}",
    ),
]  # fmt: skip


DEEP = b"[" * 900 + b"]" * 900
BAD_JSON += [
    # too deep for orjson: refused at once, not retried with Python's json (which gives up at
    # this depth on 3.11 but parses it on 3.12+), so every Python answers the same
    (b'{"inputs":' + b"[" * 5000 + b"]" * 5000 + b', "z": NaN}', "depth limit exceeded"),
    (
        b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[0],"data":' + DEEP + b"}]}",
        "nested too deeply",
    ),
    (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[' + b"9" * 400 + b"]}]}",
        "out of range",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_JSON)
def test_malformed_json_requests_are_rejected_with_a_reason(body, message):
    with pytest.raises(InvalidInput) as info:
        decode(body)
    assert message in str(info.value)
    assert info.value.status_code == 400


def binary_body(inputs: list[dict], payload: bytes) -> tuple[bytes, int]:
    header = orjson.dumps({"inputs": inputs})
    return header + payload, len(header)


def bin_input(name="x", datatype="FP32", shape=(2,), size=8, **extra) -> dict:
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(shape),
        "parameters": {"binary_data_size": size},
        **extra,
    }


def bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


BAD_BINARY = [
    ([bin_input(size=8)], b"\0" * 4, "runs past the end"),
    ([bin_input(size=4)], b"\0" * 4, "needs 8"),
    ([bin_input(size=8)], b"\0" * 12, "4 bytes of binary data follow"),
    ([bin_input(size=-8)], b"\0" * 8, "non-negative integer"),
    ([bin_input(size=True)], b"\0" * 8, "non-negative integer"),
    ([bin_input(size="8")], b"\0" * 8, "non-negative integer"),
    ([bin_input(size=2**62)], b"\0" * 8, "runs past the end"),
    ([bin_input(size=8, data=[1.0, 2.0])], b"\0" * 8, "both 'data' and binary_data_size"),
    ([bin_input(datatype="BYTES", size=3)], b"\1\0\0", "truncated"),
    ([bin_input(datatype="BYTES", size=6)], b"\x09\0\0\0ab", "claims 9 bytes"),
    (
        [bin_input(datatype="BYTES", shape=(3,), size=12)],
        bytes_elements(b"ab", b"cd"),
        "needs 3 BYTES elements but the binary data holds 2",
    ),
    (
        [bin_input(datatype="BYTES", shape=(1,), size=12)],
        bytes_elements(b"ab", b"cd"),
        "holds more",
    ),
    (
        [bin_input(size=8), bin_input(name="z", size=8)],
        b"\0" * 12,
        "input 'z': binary_data_size 8 runs past the end",
    ),
]


@pytest.mark.parametrize(("inputs", "payload", "message"), BAD_BINARY)
def test_malformed_binary_requests_are_rejected_with_a_reason(inputs, payload, message):
    body, header_length = binary_body(inputs, payload)
    with pytest.raises(InvalidInput) as info:
        decode(body, header_length)
    assert message in str(info.value)


@pytest.mark.parametrize("header_length", [-1, 10_000])
def test_header_length_outside_the_body(header_length):
    body, _ = binary_body([bin_input()], b"\0" * 8)
    with pytest.raises(InvalidInput, match=HEADER_LENGTH):
        decode(body, header_length)


def test_header_length_cutting_the_json_is_invalid_json():
    body, header_length = binary_body([bin_input()], b"\0" * 8)
    with pytest.raises(InvalidInput, match="not valid JSON"):
        decode(body, header_length - 3)


def test_huge_shapes_are_refused_before_allocating():
    for shape in ([100_000, 100_000], [10**9], [2**40, 2**40, 2**40]):
        doc = {"inputs": [tensor(shape=shape, data=[1])]}
        with pytest.raises(PayloadTooLarge, match="elements; the limit is"):
            decode(json_body(doc))
        body, header_length = binary_body([bin_input(shape=shape, size=8)], b"\0" * 8)
        with pytest.raises(PayloadTooLarge, match="elements; the limit is"):
            decode(body, header_length)


def test_limits_are_enforced():
    small = ProtocolLimits(max_body_bytes=2000, max_elements=10, max_inputs=2, max_string_bytes=3)
    with pytest.raises(PayloadTooLarge, match="body of 2001 bytes"):
        decode(b" " * 2001, limits=small)
    many = {"inputs": [tensor(name=f"x{i}") for i in range(3)]}
    with pytest.raises(PayloadTooLarge, match="3 inputs; the limit is 2"):
        decode(json_body(many), limits=small)
    six = [1] * 6
    total = {
        "inputs": [tensor(name="a", shape=[6], data=six), tensor(name="b", shape=[6], data=six)]
    }
    with pytest.raises(PayloadTooLarge, match="more than 10 elements"):
        decode(json_body(total), limits=small)
    text = {"inputs": [tensor(datatype="BYTES", shape=[1], data=["abcd"])]}
    with pytest.raises(PayloadTooLarge, match="limit is 3"):
        decode(json_body(text), limits=small)
    body, header_length = binary_body(
        [bin_input(datatype="BYTES", shape=(1,), size=8)], bytes_elements(b"abcd")
    )
    with pytest.raises(PayloadTooLarge, match="limit is 3"):
        decode(body, header_length, limits=small)


# -------------------------------------------------------------------------- compression


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request_bodies(encoding):
    body, _header_length = client_request({"x": ("FP32", sample("FP32", (4, 4)))}, True)
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    unpacked = decompress_body(packed, encoding, LIMITS)
    assert unpacked == body
    assert decompress_body(body, None, LIMITS) == body
    assert decompress_body(body, "identity", LIMITS) == body


def test_raw_deflate_and_multi_member_gzip_are_accepted():
    raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    assert decompress_body(raw.compress(b"abc") + raw.flush(), "deflate", LIMITS) == b"abc"
    assert decompress_body(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", LIMITS) == b"abcd"


def test_bad_compressed_bodies():
    with pytest.raises(InvalidInput, match="not valid gzip"):
        decompress_body(b"plain text", "gzip", LIMITS)
    with pytest.raises(InvalidInput, match="truncated"):
        decompress_body(gzip.compress(b"x" * 1000)[:-10], "gzip", LIMITS)
    with pytest.raises(InvalidInput, match="unsupported Content-Encoding 'br'"):
        decompress_body(b"x", "br", LIMITS)
    with pytest.raises(InvalidInput, match="unexpected bytes"):
        decompress_body(zlib.compress(b"x") + b"junk", "deflate", LIMITS)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_decompression_bombs_stop_at_the_limit(encoding):
    # 64 MiB of zeros in ~64 KiB; the limit is 1 MiB.
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    chunk = bytes(2**20)
    bomb = b"".join(packer.compress(chunk) for _ in range(64)) + packer.flush()
    assert len(bomb) < 2**17
    limits = ProtocolLimits(max_decompressed_bytes=2**20)
    with pytest.raises(PayloadTooLarge, match="more than the limit of 1048576 bytes"):
        decompress_body(bomb, encoding, limits)
    exact = zlib.compressobj(9, zlib.DEFLATED, wbits)
    fits = exact.compress(chunk) + exact.flush()
    assert len(decompress_body(fits, encoding, limits)) == 2**20


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("gzip;q=0.5, deflate", "deflate"),
        ("gzip;q=0, deflate;q=0", None),
        ("*", "gzip"),
        ("br", None),
        (None, None),
        ("identity", None),
    ],
)
def test_response_compression_follows_accept_encoding(accept, expected):
    y = sample("FP32", (64, 16))
    request = InferenceRequest(None, [], [OutputRequest("y", True)])
    body, headers = encode_infer_response(
        model_name="m", model_version="1", request=request, outputs={"y": y}
    )
    packed, encoding = compress_body(body, accept)
    assert encoding == expected
    if expected:
        assert len(packed) < len(body)
    result = th.InferenceServerClient.parse_response_body(
        packed, header_length=int(headers[HEADER_LENGTH]), content_encoding=encoding
    )
    np.testing.assert_array_equal(result.as_numpy("y"), y)


def test_small_bodies_are_not_compressed():
    assert compress_body(b"{}", "gzip") == (b"{}", None)


# -------------------------------------------------------------------------- check_inputs

SPECS = [TensorSpec("x", "FP32", (-1, 3)), TensorSpec("ids", "INT64", (-1, -1))]


def make_request(*tensors: InputTensor) -> InferenceRequest:
    return InferenceRequest(id=None, inputs=list(tensors), outputs=None)


def x_tensor(rows=2, datatype="FP32", from_json=False, data=None) -> InputTensor:
    if data is None:
        data = np.ones((rows, 3), dtype=np.dtype(th.triton_to_np_dtype(datatype)))
    return InputTensor("x", datatype, tuple(data.shape), data, from_json)


def ids_tensor(rows=2, length=5) -> InputTensor:
    data = np.arange(rows * length, dtype=np.int64).reshape(rows, length)
    return InputTensor("ids", "INT64", data.shape, data)


def test_check_inputs_accepts_a_matching_request():
    arrays = check_inputs(make_request(x_tensor(), ids_tensor()), SPECS, max_batch_size=8)
    assert set(arrays) == {"x", "ids"}
    assert arrays["x"].dtype == np.float32
    assert arrays["ids"].shape == (2, 5)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ((x_tensor(),), "missing input(s) 'ids'; the model expects inputs 'x', 'ids'"),
        (
            (x_tensor(), ids_tensor(), InputTensor("z", "FP32", (1,), np.ones(1, np.float32))),
            "unknown input 'z'; the model expects inputs 'x', 'ids'",
        ),
        ((x_tensor(datatype="FP64"), ids_tensor()), "datatype FP64 but the model expects FP32"),
        (
            (x_tensor(data=np.ones((2, 4), np.float32)), ids_tensor()),
            "shape [2, 4] but the model expects [-1, 3]",
        ),
        (
            (x_tensor(data=np.ones((2, 3, 1), np.float32)), ids_tensor()),
            "shape [2, 3, 1]",
        ),
        ((x_tensor(rows=9), ids_tensor(rows=9)), "batch size 9; it must be between 1 and"),
        ((x_tensor(rows=0), ids_tensor(rows=0)), "batch size 0"),
        ((x_tensor(rows=2), ids_tensor(rows=3)), "'x' has 2 rows, 'ids' has 3"),
        (
            (x_tensor(datatype="FP64", from_json=True, data=np.full((2, 3), 0.1)), ids_tensor()),
            "do not convert without loss",
        ),
    ],
)
def test_check_inputs_rejects_mismatches(tensors, message):
    with pytest.raises(InvalidInput) as info:
        check_inputs(make_request(*tensors), SPECS, max_batch_size=8)
    assert message in str(info.value)


def test_json_values_convert_losslessly_to_the_model_datatype():
    doc = {
        "inputs": [
            {"name": "x", "datatype": "FP64", "shape": [1, 3], "data": [0.5, 1, -2.25]},
            {"name": "ids", "datatype": "INT32", "shape": [1, 2], "data": [7, 8]},
        ]
    }
    arrays = check_inputs(decode(json_body(doc)), SPECS, max_batch_size=8)
    assert arrays["x"].dtype == np.float32
    assert arrays["ids"].dtype == np.int64
    np.testing.assert_array_equal(arrays["x"], [[0.5, 1, -2.25]])
    np.testing.assert_array_equal(arrays["ids"], [[7, 8]])


def test_binary_data_must_match_the_datatype_exactly():
    body, header_length = client_request(
        {"x": ("FP64", np.ones((1, 3))), "ids": ("INT64", np.ones((1, 2), np.int64))}, True
    )
    with pytest.raises(InvalidInput, match="datatype FP64 but the model expects FP32"):
        check_inputs(decode(body, header_length), SPECS, max_batch_size=8)


def test_models_without_batching_match_the_full_shape():
    specs = [TensorSpec("x", "FP32", (2, 3))]
    assert check_inputs(make_request(x_tensor(rows=2)), specs, 0)["x"].shape == (2, 3)
    with pytest.raises(InvalidInput, match="expects \\[2, 3\\]"):
        check_inputs(make_request(x_tensor(rows=3)), specs, 0)


# ---------------------------------------------------------------------------- fuzzing

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)
TENSORS = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y", ""]) | JSON_VALUES,
        "datatype": st.sampled_from(ALL_TYPES) | JSON_VALUES,
        "shape": st.lists(st.integers(-2, 4), max_size=3) | JSON_VALUES,
    },
    optional={
        "data": st.lists(JSON_VALUES, max_size=8) | JSON_VALUES,
        "parameters": st.fixed_dictionaries(
            {"binary_data_size": st.integers(-4, 40) | JSON_VALUES}
        ),
    },
)
REQUESTS = st.fixed_dictionaries(
    {"inputs": st.lists(TENSORS, max_size=3) | JSON_VALUES},
    optional={
        "id": JSON_VALUES,
        "outputs": st.lists(st.fixed_dictionaries({"name": JSON_VALUES}), max_size=2) | JSON_VALUES,
        "parameters": st.dictionaries(
            st.sampled_from(["priority", "timeout", "binary_data_output"]), JSON_VALUES
        ),
    },
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=REQUESTS, tail=st.binary(max_size=48), split=st.booleans())
def test_any_body_decodes_or_raises_a_client_error(doc, tail, split):
    header = json.dumps(doc).encode()
    body = header + tail if split else header
    try:
        request = decode(body, len(header) if split else None)
    except (InvalidInput, PayloadTooLarge) as exc:
        message = str(exc)
        assert message  # every refusal says why
        return
    for tensor in request.inputs:  # what decodes is consistent
        assert tensor.data.shape == tensor.shape
        assert tensor.data.size == int(np.prod(tensor.shape))


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=200), header_length=st.none() | st.integers(-5, 250))
def test_random_bytes_never_crash_the_decoder(body, header_length):
    with contextlib.suppress(InvalidInput, PayloadTooLarge):
        decode(body, header_length)


@settings(max_examples=80, deadline=None)
@given(
    datatype=st.sampled_from(ALL_TYPES),
    shape=st.lists(st.integers(0, 3), min_size=1, max_size=3),
    cut=st.integers(0, 400),
    shift=st.integers(-3, 3),
    flip=st.integers(0, 400),
)
def test_corrupted_binary_bodies_decode_or_raise_a_client_error(datatype, shape, cut, shift, flip):
    array = sample(datatype, tuple(shape)) if np.prod(shape) else np.zeros(shape, np.float32)
    if not np.prod(shape):
        datatype = "FP32"
    tensors = {"a": (datatype, array), "b": ("INT8", sample("INT8", (2,)))}
    body, header_length = client_request(tensors, True)
    mutated = bytearray(body[: max(cut, header_length)])
    if flip < len(mutated):
        mutated[flip] ^= 0xFF
    try:
        request = decode(bytes(mutated), header_length + shift)
    except (InvalidInput, PayloadTooLarge) as exc:
        message = str(exc)
        assert message
        return
    for tensor in request.inputs:
        assert tensor.data.shape == tensor.shape
