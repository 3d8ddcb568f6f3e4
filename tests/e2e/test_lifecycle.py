"""Poll mode hot swaps, broken models, graceful SIGTERM, and the shipped demo repository."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.helpers import infer_input, run_direct
from tests.e2e.server import REPO_ROOT
from tests.models import scaled_model, slow_model, write_model

SCALED = {"platform": "onnxruntime_onnx", "max_batch_size": 8, "dynamic_batching": {}}


def _x(value: float) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [value] * 4}]}


def test_poll_mode_swaps_versions_without_failed_requests(tmp_path: Path, start_server) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "scaled", scaled_model(2.0), model_config=SCALED)
    server = start_server(repo, "--model-control-mode", "poll", "--poll-interval", "0.2")
    url = f"{server.url}/v2/models/scaled/infer"
    stop = threading.Event()
    seen: list[tuple[int, str, float]] = []

    def hammer() -> None:
        with httpx.Client(timeout=30.0) as client:
            while not stop.is_set():
                response = client.post(url, json=_x(1.0))
                doc = response.json()
                value = doc["outputs"][0]["data"][0] if response.status_code == 200 else -1.0
                seen.append((response.status_code, doc.get("model_version", ""), value))

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(hammer) for _ in range(4)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(seen) < 20:
            time.sleep(0.05)
        assert {v for _, v, _ in seen} == {"1"}
        # publish version 2 the way a deployment would: write elsewhere, then rename in
        staging = repo / "scaled" / ".staging"
        staging.mkdir()
        (staging / "model.onnx").write_bytes(scaled_model(3.0))
        staging.rename(repo / "scaled" / "2")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(v == "2" for _, v, _ in seen[-20:]):
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        for worker in workers:
            worker.result()
    assert seen
    failed = [s for s in seen if s[0] != 200]
    assert not failed, failed[:5]
    versions = [v for _, v, _ in seen]
    assert "1" in versions
    assert versions[-1] == "2"
    assert {(v, x) for _, v, x in seen} == {("1", 2.0), ("2", 3.0)}
    index = httpx.post(f"{server.url}/v2/repository/index").json()
    assert [(m["name"], m["version"], m["state"]) for m in index] == [("scaled", "2", "READY")]

    # a removed model is unloaded by the next poll
    import shutil

    shutil.rmtree(repo / "scaled")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and httpx.post(f"{server.url}/v2/repository/index").json():
        time.sleep(0.1)
    assert httpx.post(f"{server.url}/v2/repository/index").json() == []
    assert httpx.post(url, json=_x(1.0)).status_code == 404


def _unknown_op_model() -> bytes:
    """Valid ONNX protobuf that onnxruntime refuses (an operator nobody implements)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    node = helper.make_node("NoSuchOperator", ["x"], ["y"], domain="slimserve.test")
    graph = helper.make_graph([node], "unknown_op", [x], [y])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("slimserve.test", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def test_broken_model_is_reported_and_others_serve(tmp_path: Path, start_server) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "good", scaled_model(2.0), model_config=SCALED)
    write_model(repo, "corrupt", b"\x08\x07garbage that is not onnx")
    write_model(repo, "unloadable", _unknown_op_model(), model_config=SCALED)
    (repo / "bad_config").mkdir()
    (repo / "bad_config" / "config.pbtxt").write_text("max_batch_size: 'many'\n")
    (repo / "bad_config" / "1").mkdir()
    server = start_server(repo)
    client = server.client()
    try:
        assert client.is_server_ready()
        assert client.is_model_ready("good")
        rows = {(m["name"], m["version"]): m for m in client.get_model_repository_index()}
        for name in ("corrupt", "unloadable", "bad_config"):
            entry = next(m for (n, _), m in rows.items() if n == name)
            assert entry["state"] == "UNAVAILABLE"
            assert entry["reason"], entry
        assert "config.pbtxt" in rows[("bad_config", "")]["reason"]
        assert "ModelProto" in rows[("corrupt", "")]["reason"]
        assert "onnxruntime could not load" in rows[("unloadable", "1")]["reason"]
        ready = httpx.get(f"{server.url}/v2/models/corrupt/ready")
        assert ready.status_code == 503
        assert "ModelProto" in ready.json()["error"]
        meta = httpx.get(f"{server.url}/v2/models/unloadable")
        assert meta.status_code == 503
        assert "onnxruntime could not load" in meta.json()["error"]
        result = client.infer("good", [infer_input("x", np.ones((1, 4), np.float32))])
        np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 2.0, np.float32))
    finally:
        client.close()


def _pending(server, model: str) -> int:
    text = httpx.get(f"{server.url}/metrics").text
    for line in text.splitlines():
        if line.startswith("nv_inference_pending_request_count") and f'model="{model}"' in line:
            return int(float(line.split()[-1]))
    return 0


def test_sigterm_drains_in_flight_requests(tmp_path: Path, start_server) -> None:
    repo = tmp_path / "repo"
    config = {"platform": "onnxruntime_onnx", "max_batch_size": 1, "dynamic_batching": {}}
    write_model(repo, "slow", slow_model(size=1024, repeats=2), model_config=config)
    server = start_server(repo)
    url = f"{server.url}/v2/models/slow/infer"
    with httpx.Client(timeout=60.0) as client, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.post, url, json=_x(1.0)) for _ in range(6)]
        # SIGTERM while the server holds them: one running, several queued
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _pending(server, "slow") < 3:
            time.sleep(0.005)
        server.terminate()
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 6
    # uvicorn re-raises the signal once its graceful shutdown is done
    assert server.process.wait(30) in (0, -15)
    assert "Application shutdown complete" in server.log


@pytest.mark.skipif(
    not (REPO_ROOT / "model_repository" / "digits_cnn" / "config.pbtxt").exists(),
    reason="the demo repository has no digits_cnn yet",
)
def test_demo_repository_serves(start_server) -> None:
    server = start_server(REPO_ROOT / "model_repository")
    client = server.client()
    try:
        assert client.is_model_ready("digits_cnn")
        rng = np.random.default_rng(0)
        images = rng.random((5, 1, 8, 8), dtype=np.float32) * 16
        result = client.infer("digits_cnn", [infer_input("input", images)])
        expected = run_direct(
            REPO_ROOT / "model_repository" / "digits_cnn" / "1" / "model.onnx", {"input": images}
        )
        np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], rtol=1e-5)
        index = client.get_model_repository_index()
        assert all(m["state"] == "READY" for m in index), index
    finally:
        client.close()
