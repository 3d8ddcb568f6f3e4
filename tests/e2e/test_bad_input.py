"""Client mistakes: each is a 4xx with ``{"error": ...}`` naming what was wrong."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.e2e.server import RemoteServer
from tests.models import basic_repository


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    repo = basic_repository(tmp_path_factory.mktemp("bad") / "repository")
    with RemoteServer(repo, env={"SLIMSERVE_MAX_BODY_BYTES": "200000"}) as server:
        yield server


@pytest.fixture(scope="module")
def http(server: RemoteServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield client


def _request(shape: list[int], data: object, *, name: str = "INPUT0", datatype: str = "FP32"):
    other = {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": data}
    return orjson.dumps({"inputs": [tensor, other] if name != "INPUT1" else [tensor]})


GOOD_ROW = [1.0] * 16

CASES = [
    # (id, path, body, headers, status, message fragment)
    ("malformed json", "/v2/models/add_sub/infer", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("not an object", "/v2/models/add_sub/infer", b"[1, 2]", {}, 400, "JSON object"),
    ("no inputs", "/v2/models/add_sub/infer", b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
    ("unknown model", "/v2/models/nope/infer", _request([1, 16], GOOD_ROW), {}, 404, "'nope'"),
    (
        "unknown version",
        "/v2/models/add_sub/versions/7/infer",
        _request([1, 16], GOOD_ROW),
        {},
        404,
        "no version 7",
    ),
    (
        "bad version",
        "/v2/models/add_sub/versions/x1/infer",
        _request([1, 16], GOOD_ROW),
        {},
        400,
        "positive integer",
    ),
    (
        "wrong input name",
        "/v2/models/add_sub/infer",
        _request([1, 16], GOOD_ROW, name="INPUT9"),
        {},
        400,
        "unknown input 'INPUT9'",
    ),
    (
        "missing input",
        "/v2/models/add_sub/infer",
        _request([1, 16], GOOD_ROW, name="INPUT1"),
        {},
        400,
        "missing input",
    ),
    (
        "shape mismatch",
        "/v2/models/add_sub/infer",
        _request([1, 4], [1.0] * 4),
        {},
        400,
        "shape [1, 4]",
    ),
    (
        "data count mismatch",
        "/v2/models/add_sub/infer",
        _request([1, 16], [1.0] * 3),
        {},
        400,
        "needs 16 elements",
    ),
    (
        "lossy dtype conversion",
        "/v2/models/add_sub/infer",
        _request([1, 16], [16777217] * 16, datatype="INT64"),
        {},
        400,
        "without loss",
    ),
    (
        "unknown dtype",
        "/v2/models/add_sub/infer",
        _request([1, 16], GOOD_ROW, datatype="FP8"),
        {},
        400,
        "unknown datatype",
    ),
    (
        "negative dim",
        "/v2/models/add_sub/infer",
        _request([-1, 16], GOOD_ROW),
        {},
        400,
        "negative",
    ),
    (
        "huge dims",
        "/v2/models/add_sub/infer",
        _request([1 << 40, 1 << 40], GOOD_ROW),
        {},
        413,
        "limit",
    ),
    (
        "batch over max_batch_size",
        "/v2/models/add_sub/infer",
        _request([9, 16], GOOD_ROW * 9),
        {},
        400,
        "max_batch_size",
    ),
    (
        "header length larger than body",
        "/v2/models/add_sub/infer",
        _request([1, 16], GOOD_ROW),
        {"Inference-Header-Content-Length": "999999"},
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "header length not a number",
        "/v2/models/add_sub/infer",
        _request([1, 16], GOOD_ROW),
        {"Inference-Header-Content-Length": "ten"},
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "binary size past the body",
        "/v2/models/add_sub/infer",
        orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "datatype": "FP32",
                        "shape": [1, 16],
                        "parameters": {"binary_data_size": 64},
                    }
                ]
            }
        )
        + b"\0" * 10,
        {"Inference-Header-Content-Length": "__LEN__"},
        400,
        "binary",
    ),
    (
        "bad gzip",
        "/v2/models/add_sub/infer",
        b"this is not gzip",
        {"Content-Encoding": "gzip"},
        400,
        "gzip",
    ),
    (
        "unknown encoding",
        "/v2/models/add_sub/infer",
        _request([1, 16], GOOD_ROW),
        {"Content-Encoding": "br"},
        400,
        "Content-Encoding",
    ),
    (
        "body over the limit",
        "/v2/models/add_sub/infer",
        b" " * 300_000,
        {},
        413,
        "limit",
    ),
    (
        "gzip bomb",
        "/v2/models/add_sub/infer",
        gzip.compress(b" " * 50_000_000),
        {"Content-Encoding": "gzip"},
        413,
        "limit",
    ),
    (
        "unknown output",
        "/v2/models/add_sub/infer",
        orjson.dumps(
            {
                **orjson.loads(_request([1, 16], GOOD_ROW)),
                "outputs": [{"name": "OUTPUT7"}],
            }
        ),
        {},
        400,
        "OUTPUT7",
    ),
    (
        "priority not an integer",
        "/v2/models/add_sub/infer",
        orjson.dumps(
            {**orjson.loads(_request([1, 16], GOOD_ROW)), "parameters": {"priority": "hi"}}
        ),
        {},
        400,
        "priority",
    ),
    ("dotdot model name", "/v2/models/%2E%2E/infer", b"{}", {}, 400, "invalid model name"),
    ("dotdot in name", "/v2/models/a..b/ready", b"", {}, 405, "not allowed"),
    ("slash in model name", "/v2/models/..%2F..%2Fetc/infer", b"{}", {}, 404, "no endpoint"),
    ("unknown endpoint", "/v2/nothing", b"{}", {}, 404, "no endpoint"),
    ("wrong method", "/v2/health/live", b"{}", {}, 405, "not allowed"),
    ("index with bad body", "/v2/repository/index", b"{", {}, 400, "not valid JSON"),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "fragment"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_client_mistake(
    http: httpx.Client,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    fragment: str,
) -> None:
    headers = dict(headers)
    if headers.get("Inference-Header-Content-Length") == "__LEN__":
        headers["Inference-Header-Content-Length"] = str(body.index(b"\0"))
    response = http.post(path, content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error
    assert "Traceback" not in error


def test_dtype_mismatch_on_binary_data_is_named(http: httpx.Client) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16],
                 "parameters": {"binary_data_size": 64}},
                {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16],
                 "parameters": {"binary_data_size": 64}},
            ]
        }
    )  # fmt: skip
    response = http.post(
        "/v2/models/add_sub/infer",
        content=header + b"\0" * 128,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert "INT32" in error
    assert "FP32" in error


def test_server_survives_the_corpus(http: httpx.Client) -> None:
    response = http.post("/v2/models/add_sub/infer", content=_request([1, 16], GOOD_ROW))
    assert response.status_code == 200
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs["OUTPUT0"] == [1.0] * 16


def test_repository_path_stays_inside(server: RemoteServer) -> None:
    root = Path(server.repository)
    assert sorted(p.name for p in root.iterdir()) == ["add_sub", "all_types"]
