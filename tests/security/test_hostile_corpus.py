"""Hostile-input corpus against ONE real server: every case is a 4xx naming what was wrong,
after which the server still answers a valid inference and no file appeared outside the
repository and jobs folders (nothing unpickled, nothing extracted or written elsewhere)."""

from __future__ import annotations

import base64
import gzip
import json
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.server import RemoteServer
from tests.models import (
    basic_repository,
    external_data_model,
    scaled_model,
    tar_with_link,
    zip_bytes,
)
from tests.pickle_payloads import Armed

MAX_BODY = 1_000_000
MAX_UPLOAD = 300_000
MAX_ELEMENTS = 100_000
MAX_DECOMPRESSED = 2_000_000
ROW = [1.0] * 16
INFER = "/v2/models/add_sub/infer"


@dataclass
class Case:
    """One hostile request: ``build(root)`` gives httpx ``request`` keyword arguments."""

    id: str
    method: str
    path: str
    build: Callable[[Path], dict[str, Any]]
    status: int | tuple[int, ...]
    fragment: str


def tensor(name: str = "INPUT0", shape: Any = (1, 16), data: Any = ROW, dt: str = "FP32"):
    return {"name": name, "datatype": dt, "shape": list(shape), "data": data}


def json_body(*inputs: dict, **top: Any) -> Callable[[Path], dict[str, Any]]:
    """An infer body with ``inputs`` (INPUT1 added when only INPUT0 is given)."""
    tensors = list(inputs)
    if len(tensors) == 1 and tensors[0]["name"] == "INPUT0":
        tensors.append(tensor("INPUT1"))
    return lambda root: {"content": orjson.dumps({"inputs": tensors, **top})}


def raw(content: bytes, **headers: str) -> Callable[[Path], dict[str, Any]]:
    return lambda root: {"content": content, "headers": headers}


def binary(sizes: tuple[int, int], payload: bytes, *, header_extra: int = 0, **headers: str):
    """A binary-extension body: JSON header declaring ``sizes`` bytes, then ``payload``."""
    header = orjson.dumps(
        {
            "inputs": [
                {"name": n, "datatype": "FP32", "shape": [1, 16],
                 "parameters": {"binary_data_size": s}}
                for n, s in zip(("INPUT0", "INPUT1"), sizes, strict=True)
            ]
        }
    )  # fmt: skip
    length = str(len(header) + header_extra)
    return raw(header + payload, **{"Inference-Header-Content-Length": length, **headers})


def bytes_request(element: bytes) -> Callable[[Path], dict[str, Any]]:
    """A BYTES tensor of ``all_types`` whose binary payload is ``element`` (length-prefixed)."""
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "IN_BYTES", "datatype": "BYTES", "shape": [1, 3],
                 "parameters": {"binary_data_size": len(element)}}
            ]
        }
    )  # fmt: skip
    return raw(header + element, **{"Inference-Header-Content-Length": str(len(header))})


def upload(filename: str, data: Callable[[Path], bytes], request: dict | None = None):
    def build(root: Path) -> dict[str, Any]:
        return {
            "files": {"model": (filename, data(root))},
            "data": {"request": json.dumps(request or {"name": "victim"})},
        }

    return build


def armed(root: Path) -> bytes:
    return pickle.dumps(Armed(root / "PWNED"))


def load_body(parameters: dict[str, str]) -> Callable[[Path], dict[str, Any]]:
    return lambda root: {"content": orjson.dumps({"parameters": parameters})}


ONNX_B64 = base64.b64encode(scaled_model(3.0)).decode()
GZIP_BOMB = gzip.compress(b"{" + b" " * (MAX_DECOMPRESSED * 2) + b"}", compresslevel=9)
DEEP = b'{"inputs": [' + b"[" * 5000 + b"]" * 5000 + b"]}"

CASES = [
    # -- binary protocol ------------------------------------------------------------------
    Case("header length past the body", "POST", INFER,
         binary((64, 64), bytes(128), header_extra=1000), 400, "Inference-Header-Content-Length"),
    Case("header length not a number", "POST", INFER,
         binary((64, 64), bytes(128), **{"Inference-Header-Content-Length": "12abc"}),
         400, "non-negative integer"),
    Case("header length negative", "POST", INFER,
         binary((64, 64), bytes(128), **{"Inference-Header-Content-Length": "-5"}),
         400, "non-negative integer"),
    Case("negative binary_data_size", "POST", INFER, binary((-64, 64), bytes(128)),
         400, "binary_data_size"),
    Case("huge binary_data_size", "POST", INFER, binary((10**18, 64), bytes(128)),
         400, "binary_data_size"),
    Case("binary_data_size too small for shape", "POST", INFER, binary((32, 96), bytes(128)),
         400, "INPUT0"),
    Case("binary data shorter than declared", "POST", INFER, binary((64, 64), bytes(100)),
         400, "binary"),
    Case("trailing bytes after binary data", "POST", INFER, binary((64, 64), bytes(200)),
         400, "bytes"),
    Case("truncated BYTES element", "POST", "/v2/models/all_types/infer",
         bytes_request((100).to_bytes(4, "little") + b"abc"), 400, "BYTES"),
    Case("BYTES length prefix cut short", "POST", "/v2/models/all_types/infer",
         bytes_request(b"\x05\x00"), 400, "BYTES"),
    # -- JSON ---------------------------------------------------------------------------
    Case("string where numbers belong", "POST", INFER,
         json_body(tensor(data=["x"] * 16)), 400, "INPUT0"),
    Case("ragged nested lists", "POST", INFER,
         json_body(tensor(shape=(2, 16), data=[ROW, ROW[:5]])), 400, "INPUT0"),
    Case("NaN in an integer tensor", "POST", "/v2/models/all_types/infer",
         raw(b'{"inputs": [{"name": "IN_INT32", "datatype": "INT32", "shape": [1, 3], '
             b'"data": [1, NaN, 2]}]}'), 400, "IN_INT32"),
    Case("Infinity in an integer tensor", "POST", "/v2/models/all_types/infer",
         raw(b'{"inputs": [{"name": "IN_INT64", "datatype": "INT64", "shape": [1, 3], '
             b'"data": [1, Infinity, 2]}]}'), 400, "IN_INT64"),
    Case("FP32 overflow", "POST", INFER, json_body(tensor(data=[1e300] * 16)), 400, "FP32"),
    Case("10^9-element shape", "POST", INFER,
         json_body(tensor(shape=(1000, 1000000), data=[1.0])), (400, 413), "limit"),
    Case("negative dimension", "POST", INFER, json_body(tensor(shape=(-1, 16))), 400, "shape"),
    Case("non-integer dimension", "POST", INFER, json_body(tensor(shape=("a", 16))), 400, "shape"),
    Case("unknown datatype", "POST", INFER, json_body(tensor(dt="FP128")), 400, "FP128"),
    Case("INT8 out of range", "POST", "/v2/models/all_types/infer",
         json_body(tensor("IN_INT8", (1, 3), [1, 2, 300], "INT8")), 400, "IN_INT8"),
    Case("duplicate input", "POST", INFER,
         json_body(tensor(), tensor(), tensor("INPUT1")), 400, "INPUT0"),
    Case("too many inputs", "POST", INFER,
         json_body(*[tensor(f"IN{i}", (1, 1), [1.0]) for i in range(70)]), (400, 413), "64"),
    Case("unknown output", "POST", INFER,
         json_body(tensor(), outputs=[{"name": "../../etc/passwd"}]), 400, "unknown output"),
    Case("batch beyond max_batch_size", "POST", INFER,
         json_body(tensor(shape=(9, 16), data=ROW * 9), tensor("INPUT1", (9, 16), ROW * 9)),
         400, "max_batch_size"),
    Case("priority of the wrong type", "POST", INFER,
         json_body(tensor(), parameters={"priority": "high"}), 400, "priority"),
    Case("negative timeout", "POST", INFER,
         json_body(tensor(), parameters={"timeout": -1}), 400, "timeout"),
    Case("JSON nested 5000 deep", "POST", INFER, raw(DEEP), 400, "depth"),
    # -- headers and bodies -------------------------------------------------------------
    Case("body over the limit", "POST", INFER, raw(b" " * (MAX_BODY + 1)), 413, str(MAX_BODY)),
    Case("gzip bomb", "POST", INFER, raw(GZIP_BOMB, **{"Content-Encoding": "gzip"}),
         413, str(MAX_DECOMPRESSED)),
    Case("corrupt gzip", "POST", INFER, raw(b"\x1f\x8bnot gzip", **{"Content-Encoding": "gzip"}),
         400, "gzip"),
    Case("unknown content encoding", "POST", INFER,
         raw(b"{}", **{"Content-Encoding": "zstd-ultra"}), 400, "zstd-ultra"),
    # -- model names --------------------------------------------------------------------
    Case("dotdot model name", "POST", "/v2/models/%2E%2E/infer", raw(b"{}"), 400, ".."),
    Case("NUL in model name", "GET", "/v2/models/add%00sub", raw(b""), 400, "invalid model name"),
    Case("10k-character model name", "GET", "/v2/models/" + "a" * 10_000, raw(b""),
         400, "invalid model name"),
    Case("load of a dotdot model", "POST", "/v2/repository/models/%2E%2E/load", raw(b"{}"),
         400, ".."),
    Case("load writing outside via file:", "POST", "/v2/repository/models/add_sub/load",
         load_body({"file:../../evil.onnx": ONNX_B64}), 400, "evil.onnx"),
    Case("load writing outside via version", "POST", "/v2/repository/models/add_sub/load",
         load_body({"file:1/../../../evil.onnx": ONNX_B64}), 400, "evil.onnx"),
    Case("load with absolute file:", "POST", "/v2/repository/models/add_sub/load",
         load_body({"file:/tmp/evil.onnx": ONNX_B64}), 400, "evil.onnx"),
    Case("load with malformed config", "POST", "/v2/repository/models/add_sub/load",
         load_body({"config": "{not json"}), 400, "config"),
    # -- uploads ------------------------------------------------------------------------
    Case("zip slip", "POST", "/v2/optimize",
         upload("m.zip", lambda r: zip_bytes({"../../evil.onnx": scaled_model(2.0)})),
         400, "outside"),
    Case("absolute member", "POST", "/v2/optimize",
         upload("m.zip", lambda r: zip_bytes({"/tmp/evil.onnx": scaled_model(2.0)})),
         400, "absolute"),
    Case("symlink out", "POST", "/v2/optimize",
         upload("m.tar.gz", lambda r: tar_with_link("/etc/passwd")), 400, "link"),
    Case("hardlink out", "POST", "/v2/optimize",
         upload("m.tar.gz", lambda r: tar_with_link("../../../etc/passwd", hard=True)),
         400, "link"),
    Case("pickle checkpoint with __reduce__", "POST", "/v2/optimize",
         upload("model.pt", armed), 400, "pickle"),
    Case("pickle .bin in a checkpoint folder", "POST", "/v2/optimize",
         upload("hf.zip", lambda r: zip_bytes({"config.json": b"{}",
                                               "pytorch_model.bin": armed(r)})),
         400, "pickle"),
    Case("ONNX external data ../../", "POST", "/v2/optimize",
         upload("m.zip", lambda r: zip_bytes(
             {"m/model.onnx": external_data_model("../../etc/passwd")})), 400, "outside"),
    Case("upload name ../../etc", "POST", "/v2/optimize",
         upload("m.onnx", lambda r: scaled_model(2.0), {"name": "../../etc"}), 400, "name"),
    Case("upload over the limit", "POST", "/v2/optimize",
         upload("big.onnx", lambda r: bytes(2 * MAX_UPLOAD)), 413, str(MAX_UPLOAD)),
]  # fmt: skip


def snapshot(root: Path, skip: tuple[str, ...]) -> dict[str, int]:
    """Every file under ``root`` (outside the ``skip`` folders) with its size."""
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] not in skip
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteServer, Path]]:
    root = tmp_path_factory.mktemp("hostile")
    repo = basic_repository(root / "repository")
    env = {
        "SLIMSERVE_JOBS_DIR": str(root / "jobs"),
        "SLIMSERVE_MAX_BODY_BYTES": str(MAX_BODY),
        "SLIMSERVE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "SLIMSERVE_MAX_ELEMENTS": str(MAX_ELEMENTS),
        "SLIMSERVE_MAX_DECOMPRESSED_BYTES": str(MAX_DECOMPRESSED),
    }
    args = ("--model-control-mode", "explicit", "--load-model", "*")
    with RemoteServer(repo, *args, env=env) as server:
        yield server, root


@pytest.fixture(scope="module")
def http(served: tuple[RemoteServer, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0].url, timeout=60.0) as client:
        yield client


@pytest.fixture(scope="module")
def before(served: tuple[RemoteServer, Path]) -> dict[str, dict[str, int]]:
    root = served[1]
    return {
        "outside": snapshot(root.parent, (root.name,)),
        "root": snapshot(root, ("repository", "jobs")),
        "repository": snapshot(root / "repository", ()),
    }


def assert_serving(http: httpx.Client) -> None:
    body = orjson.dumps({"inputs": [tensor(), tensor("INPUT1", data=[2.0] * 16)]})
    response = http.post(INFER, content=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs["OUTPUT0"] == [3.0] * 16
    assert outputs["OUTPUT1"] == [-1.0] * 16


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request_is_refused(
    case: Case, served: tuple[RemoteServer, Path], http: httpx.Client, before: dict
) -> None:
    root = served[1]
    response = http.request(case.method, case.path, **case.build(root))
    statuses = case.status if isinstance(case.status, tuple) else (case.status,)
    assert response.status_code in statuses, response.text[:500]
    error = response.json()["error"]
    assert case.fragment.lower() in error.lower(), error
    assert "Traceback" not in error
    assert_serving(http)
    assert not (root / "PWNED").exists(), "an upload was unpickled"
    assert snapshot(root.parent, (root.name,)) == before["outside"]
    assert snapshot(root, ("repository", "jobs")) == before["root"]
    assert snapshot(root / "repository", ()) == before["repository"]


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


def test_no_job_was_created_and_server_log_is_clean(
    served: tuple[RemoteServer, Path], http: httpx.Client
) -> None:
    assert http.get("/v2/optimize/jobs").json() == {"jobs": []}
    jobs = served[1] / "jobs"
    assert not jobs.exists() or list(jobs.iterdir()) == [], "refused uploads leave no files"
    assert "Traceback" not in served[0].log
