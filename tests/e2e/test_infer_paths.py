"""The infer fast path (ASGI middleware inside FastAPI, or around the whole app as
``slimserve serve`` runs it) and the FastAPI routes answer identically."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from fastapi.testclient import TestClient

from serving.app import build_app, build_server_app
from serving.settings import Settings
from tests.models import basic_repository

ROW = [float(i) for i in range(16)]


def _json(name: str = "INPUT0", shape: list[int] | None = None, data: list | None = None) -> bytes:
    tensors = [
        {"name": name, "datatype": "FP32", "shape": shape or [1, 16], "data": data or ROW},
        {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": ROW},
    ]
    return orjson.dumps({"id": "x", "inputs": tensors})


def _binary() -> tuple[bytes, dict[str, str]]:
    import numpy as np

    raw = np.arange(16, dtype=np.float32).tobytes()
    tensors = [
        {"name": n, "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}}
        for n in ("INPUT0", "INPUT1")
    ]
    header = orjson.dumps({"inputs": tensors, "parameters": {"binary_data_output": True}})
    return header + raw + raw, {"Inference-Header-Content-Length": str(len(header))}


REQUESTS = [
    ("/v2/models/add_sub/infer", _json(), {}),
    ("/v2/models/add_sub/versions/1/infer", _json(), {}),
    ("/v2/models/add_sub/infer", *_binary()),
    ("/v2/models/add_sub/infer", _json(name="NOPE"), {}),
    ("/v2/models/add_sub/infer", _json(shape=[1, 3], data=[1.0, 2.0, 3.0]), {}),
    ("/v2/models/add_sub/versions/9/infer", _json(), {}),
    ("/v2/models/add_sub/versions/zero/infer", _json(), {}),
    ("/v2/models/missing/infer", _json(), {}),
    ("/v2/models/add_sub/infer", b"{", {}),
    ("/v2/models/add_sub/infer", _json(), {"Content-Encoding": "gzip"}),
]


def _answers(repo: Path, placement: str) -> list[tuple[int, bytes, str | None]]:
    settings = Settings(repository=repo)
    if placement == "outermost":
        app = build_server_app(settings)
    else:
        app = build_app(settings, fast_infer=placement == "middleware")
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "models did not load"
            time.sleep(0.02)
        answers = []
        for path, body, headers in REQUESTS:
            response = client.post(path, content=body, headers=headers)
            answers.append(
                (
                    response.status_code,
                    response.content,
                    response.headers.get("inference-header-content-length"),
                )
            )
        return answers


def test_fast_path_and_routes_agree(tmp_path: Path) -> None:
    repo = basic_repository(tmp_path / "repo")
    fast = _answers(repo, "middleware")
    routed = _answers(repo, "routes")
    outermost = _answers(repo, "outermost")
    assert [a[0] for a in fast] == [200, 200, 200, 400, 400, 404, 400, 404, 400, 400]
    for (path, _, _), a, b, c in zip(REQUESTS, fast, routed, outermost, strict=True):
        assert a == b == c, path
    assert orjson.loads(fast[0][1])["outputs"][0]["data"] == [2.0 * x for x in ROW]
    assert fast[2][2] is not None  # binary outputs carry the header length
