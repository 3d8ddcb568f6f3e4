"""A real server on a small repository, driven by the unmodified ``tritonclient.http``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.helpers import infer_input, run_direct
from tests.e2e.server import RemoteServer
from tests.models import ALL_TYPES, basic_repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return basic_repository(tmp_path_factory.mktemp("inference") / "repository")


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RemoteServer]:
    with RemoteServer(repo) as server:
        yield server


@pytest.fixture
def client(server: RemoteServer) -> Iterator[httpclient.InferenceServerClient]:
    client = server.client()
    yield client
    client.close()


def test_live_ready_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "slimserve"
    assert "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("add_sub")
    assert client.is_model_ready("add_sub", "1")
    assert not client.is_model_ready("add_sub", "2")
    assert not client.is_model_ready("no_such_model")


def test_model_metadata_and_config(client: httpclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("add_sub")
    assert meta["name"] == "add_sub"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("INPUT0", "FP32", [-1, 16]),
        ("INPUT1", "FP32", [-1, 16]),
    ]
    assert [t["name"] for t in meta["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    config = client.get_model_config("add_sub")
    assert config["name"] == "add_sub"
    assert config["max_batch_size"] == 8
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 2000
    assert [i["name"] for i in config["input"]] == ["INPUT0", "INPUT1"]
    # auto-completed from the ONNX graph
    auto = client.get_model_config("all_types")
    assert len(auto["input"]) == len(ALL_TYPES)


@pytest.mark.parametrize("binary", [False, True])
def test_add_sub_matches_onnxruntime(
    client: httpclient.InferenceServerClient, repo: Path, binary: bool
) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 16)).astype(np.float32)
    b = rng.standard_normal((3, 16)).astype(np.float32)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")
    ]
    result = client.infer(
        "add_sub",
        [infer_input("INPUT0", a, binary=binary), infer_input("INPUT1", b, binary=binary)],
        outputs=outputs,
        request_id="req-7",
    )
    expected = run_direct(repo / "add_sub" / "1" / "model.onnx", {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected["OUTPUT0"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), expected["OUTPUT1"])
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_version"] == "1"


def test_one_output_only(client: httpclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), np.float32)
    result = client.infer(
        "add_sub",
        [infer_input("INPUT0", a), infer_input("INPUT1", a)],
        outputs=[httpclient.InferRequestedOutput("OUTPUT1")],
        model_version="1",
    )
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((1, 16), np.float32))


def _all_type_arrays() -> dict[str, np.ndarray]:
    arrays = {}
    for datatype in ALL_TYPES:
        if datatype == "BYTES":
            arrays[datatype] = np.array([[b"a", b"", "ü".encode()], [b"x", b"yz", b"0"]], object)
        elif datatype == "BOOL":
            arrays[datatype] = np.array([[True, False, True], [False, False, True]])
        else:
            from serving.datatypes import numpy_dtype

            arrays[datatype] = np.arange(6).reshape(2, 3).astype(numpy_dtype(datatype))
    return arrays


@pytest.mark.parametrize("binary", [False, True])
def test_every_datatype_round_trips(
    client: httpclient.InferenceServerClient, repo: Path, binary: bool
) -> None:
    arrays = _all_type_arrays()
    inputs = [infer_input(f"IN_{t}", a, binary=binary) for t, a in arrays.items()]
    outputs = [httpclient.InferRequestedOutput(f"OUT_{t}", binary_data=binary) for t in arrays]
    result = client.infer("all_types", inputs, outputs=outputs)
    # onnxruntime takes strings as str: feed it the decoded text, expect the original bytes back
    direct = {f"IN_{t}": a for t, a in arrays.items()}
    direct["IN_BYTES"] = np.vectorize(lambda b: b.decode())(arrays["BYTES"]).astype(object)
    expected = run_direct(repo / "all_types" / "1" / "model.onnx", direct)
    for datatype in arrays:
        got = result.as_numpy(f"OUT_{datatype}")
        want = expected[f"OUT_{datatype}"]
        if datatype == "BYTES":
            # tritonclient hands JSON strings back as str, binary ones as bytes
            got_bytes = [[x.encode() if isinstance(x, str) else x for x in r] for r in got.tolist()]
            assert got_bytes == [[x.encode() for x in row] for row in want.tolist()]
            assert got_bytes == arrays["BYTES"].tolist()
        else:
            assert got.dtype == want.dtype, datatype
            np.testing.assert_array_equal(got, want)


def test_gzip_request_and_response(client: httpclient.InferenceServerClient) -> None:
    a = np.full((8, 16), 2.0, np.float32)
    result = client.infer(
        "add_sub",
        [infer_input("INPUT0", a, binary=False), infer_input("INPUT1", a, binary=False)],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)],
        request_compression_algorithm="gzip",
        response_compression_algorithm="gzip",
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)
    result = client.infer(
        "add_sub",
        [infer_input("INPUT0", a), infer_input("INPUT1", a)],
        request_compression_algorithm="deflate",
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - a)


def test_concurrent_callers_get_their_own_rows(server: RemoteServer) -> None:
    """16 threads, each with its own tritonclient, send 96 single-row requests at once.

    (tritonclient's ``async_infer`` sends one request at a time on a quiet machine, so real
    threads are what makes the requests overlap at the server.)
    """
    from concurrent.futures import ThreadPoolExecutor

    def call(caller: int) -> tuple[int, np.ndarray]:
        a = np.full((1, 16), float(caller), np.float32)
        b = np.arange(16, dtype=np.float32).reshape(1, 16)
        client = server.client()
        try:
            result = client.infer("add_sub", [infer_input("INPUT0", a), infer_input("INPUT1", b)])
        finally:
            client.close()
        return caller, result.as_numpy("OUTPUT0")[0]

    stats = server.client()
    try:
        before = stats.get_inference_statistics("add_sub")["model_stats"][0]
        with ThreadPoolExecutor(16) as pool:
            for caller, got in pool.map(call, range(96)):
                np.testing.assert_array_equal(got, caller + np.arange(16, dtype=np.float32))
        after = stats.get_inference_statistics("add_sub")["model_stats"][0]
    finally:
        stats.close()
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 96
    assert executions < inferences, "dynamic batching formed no batch larger than 1"
    sizes = {int(s["batch_size"]) for s in after["batch_stats"]}
    assert max(sizes) > 1


def test_statistics_and_metrics_count_requests(server: RemoteServer) -> None:
    import httpx

    client = server.client()
    try:
        before = client.get_inference_statistics("all_types", "1")["model_stats"][0]
        arrays = _all_type_arrays()
        for _ in range(3):
            client.infer("all_types", [infer_input(f"IN_{t}", a) for t, a in arrays.items()])
        with pytest.raises(InferenceServerException):
            client.infer("all_types", [infer_input("IN_FP32", arrays["FP32"])])
        stats = client.get_inference_statistics("all_types", "1")["model_stats"][0]
        everything = client.get_inference_statistics()["model_stats"]
    finally:
        client.close()
    assert (stats["name"], stats["version"]) == ("all_types", "1")
    assert stats["inference_count"] - before["inference_count"] == 6  # 3 requests of 2 rows

    def count(entry: dict, kind: str) -> int:
        return entry["inference_stats"][kind]["count"]

    assert count(stats, "success") - count(before, "success") == 3
    assert count(stats, "fail") - count(before, "fail") == 1
    assert {s["name"] for s in everything} >= {"add_sub", "all_types"}
    text = httpx.get(f"{server.url}/metrics").text
    lines = [
        line
        for line in text.splitlines()
        if 'model="all_types"' in line and line.startswith("nv_inference_request_success")
    ]
    assert lines, text[:2000]
    assert float(lines[0].split()[-1]) >= 3


def test_load_unload_refused_in_mode_none(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="not allowed in model control mode 'none'"):
        client.load_model("add_sub")
    with pytest.raises(InferenceServerException, match="not allowed"):
        client.unload_model("add_sub")
    index = client.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        ("add_sub", "1", "READY"),
        ("all_types", "1", "READY"),
    }
