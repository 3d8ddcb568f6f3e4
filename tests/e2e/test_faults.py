"""Faults, each against a real server: an engine failing on some inputs, a crash in the
middle of publishing a version, unload while requests run, and load/unload memory.

Covered elsewhere (not duplicated): the optimization worker killed with SIGKILL mid-job
(``test_jobs_lifecycle.py::test_worker_killed_by_sigkill_fails_the_job_only``) and SIGTERM
draining in-flight requests (``test_lifecycle.py::test_sigterm_drains_in_flight_requests``).
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper

from serving.repository import ModelRepository
from tests.e2e.server import REPO_ROOT, RemoteServer
from tests.models import _model, mlp_model, scaled_model, slow_model, write_model


def gather_model() -> bytes:
    """``y = GatherElements(x, idx, axis=1)``: an index outside ``[-4, 3]`` makes ONNX Runtime
    raise, so the engine fails on those inputs only."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    node = helper.make_node("GatherElements", ["x", "idx"], ["y"], axis=1)
    return _model(helper.make_graph([node], "gather", [x, idx], [y]))


def gather_body(row: list[float], index: list[int]) -> dict:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": row},
            {"name": "idx", "datatype": "INT64", "shape": [1, 4], "data": index},
        ]
    }


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_engine_failure_hits_only_the_failing_request(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = tmp_path / "repo"
    config = {
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,
        # a long queue delay so the concurrent requests below form one batch
        "dynamic_batching": {
            "max_queue_delay_microseconds": 3_000_000,
            "preferred_batch_size": [6],
        },
    }
    write_model(repo, "gather", gather_model(), model_config=config)
    server = start_server(repo)
    url = f"{server.url}/v2/models/gather/infer"
    good = [gather_body([float(i), 10.0, 20.0, 30.0], [3, 2, 1, 0]) for i in range(5)]
    bad = gather_body([1.0, 2.0, 3.0, 4.0], [0, 1, 99, 0])
    with httpx.Client(timeout=60.0) as client, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.post, url, json=body) for body in [*good, bad]]
        responses = [f.result() for f in futures]
    *oks, failed = responses
    for i, response in enumerate(oks):
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [30.0, 20.0, 10.0, float(i)]
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert "GatherElements" in error, error
    assert "Out of range" in error, error
    # the requests really shared a batch (then ran one by one), and the model stays up
    pattern = r"failed on a batch of [2-6] requests; running them one by one"
    assert re.search(pattern, server.log), server.log[-3000:]
    ready = httpx.get(f"{server.url}/v2/models/gather/ready")
    assert ready.status_code == 200
    again = httpx.post(url, json=good[0], timeout=30)
    assert again.status_code == 200


PUBLISH_AND_HANG = """
import sys, time
from pathlib import Path
import serving.repository as repository

def hang(path):
    Path(sys.argv[3]).write_text("writing")  # the temp folder is written, not yet renamed
    time.sleep(600)

repository.fsync_tree = hang
data = Path(sys.argv[2]).read_bytes()
repository.ModelRepository(Path(sys.argv[1])).publish_version(
    "scaled", {"model.onnx": data[: len(data) // 2]}, version=2
)
"""


def test_crash_mid_publish_never_loads_a_half_version(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = tmp_path / "repo"
    config = {"platform": "onnxruntime_onnx", "max_batch_size": 4}
    write_model(repo, "scaled", scaled_model(2.0), model_config=config)
    server = start_server(repo, "--model-control-mode", "poll", "--poll-interval", "0.2")
    url = f"{server.url}/v2/models/scaled/infer"
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}]}

    source = tmp_path / "v2.onnx"
    source.write_bytes(scaled_model(3.0))
    flag = tmp_path / "flag"
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISH_AND_HANG, str(repo), str(source), str(flag)],
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline:
            assert publisher.poll() is None, "the publisher exited early"
            time.sleep(0.02)
        assert flag.exists()
        publisher.send_signal(signal.SIGKILL)  # the crash: half a model in the temp folder
        publisher.wait(10)
    finally:
        if publisher.poll() is None:
            publisher.kill()
    leftovers = [p.name for p in (repo / "scaled").iterdir() if p.name not in ("1", "config.pbtxt")]
    assert len(leftovers) == 1, leftovers  # the hidden temp folder, not a version "2"
    assert not (repo / "scaled" / "2").exists()

    # several poll rounds: version 1 keeps serving, nothing else is ever loaded
    with httpx.Client(timeout=30.0) as client:
        for _ in range(10):
            response = client.post(url, json=body)
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == "1"
            assert response.json()["outputs"][0]["data"] == [2.0] * 4
            time.sleep(0.1)
        index = client.post(f"{server.url}/v2/repository/index").json()
    assert [(row["name"], row["version"]) for row in index] == [("scaled", "1")]

    # a complete publish is picked up by the same polling: the half version was not missed
    ModelRepository(repo).publish_version("scaled", {"model.onnx": source}, version=3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = httpx.post(url, json=body, timeout=30)
        if response.json().get("model_version") == "3":
            break
        time.sleep(0.1)
    assert response.json()["outputs"][0]["data"] == [3.0] * 4
    # a restarted server sweeps the crashed publish's temp folder away
    server.stop()
    restarted = start_server(repo)
    assert sorted(p.name for p in (repo / "scaled").iterdir()) == ["1", "3", "config.pbtxt"]
    assert httpx.post(f"{restarted.url}/v2/models/scaled/infer", json=body).status_code == 200


def test_unload_while_requests_are_in_flight(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = tmp_path / "repo"
    config = {"platform": "onnxruntime_onnx", "max_batch_size": 1, "dynamic_batching": {}}
    write_model(repo, "slow", slow_model(size=512, repeats=4), model_config=config)
    server = start_server(
        repo, "--model-control-mode", "explicit", "--load-model", "slow",
        env={"SLIMSERVE_DRAIN_TIMEOUT_S": "20"},
    )  # fmt: skip
    url = f"{server.url}/v2/models/slow/infer"
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}]}
    with httpx.Client(timeout=60.0) as client, ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(client.post, url, json=body) for _ in range(8)]
        time.sleep(0.3)
        started = time.monotonic()
        unload = client.post(f"{server.url}/v2/repository/models/slow/unload")
        unload_s = time.monotonic() - started
        late = client.post(url, json=body)
        responses = [f.result(timeout=60) for f in futures]
    assert unload.status_code == 200, unload.text
    assert unload_s < 20
    for response in responses:
        if response.status_code == 200:
            assert response.json()["outputs"][0]["data"] == [1.0] * 4
        else:  # a clear refusal, never a hang or a 500
            assert response.status_code == 503, response.text
            assert "slow" in response.json()["error"]
    assert sum(r.status_code == 200 for r in responses) >= 1, "running requests finish"
    assert late.status_code == 503
    assert "slow" in late.json()["error"]
    reload = httpx.post(f"{server.url}/v2/repository/models/slow/load", timeout=60)
    assert reload.status_code == 200
    assert httpx.post(url, json=body, timeout=60).status_code == 200


@pytest.mark.slow
def test_load_unload_fifty_times_returns_memory(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = tmp_path / "repo"
    config = {"platform": "onnxruntime_onnx", "max_batch_size": 8}
    write_model(repo, "mlp", mlp_model(width=1024, depth=4), model_config=config)
    # glibc's dynamic mmap threshold rises after a model-sized (16 MB) block is freed, so
    # the next model's weights land on the heap and RSS swings by one model (135 <-> 151
    # MiB) from cycle to cycle; fixing the threshold (and capping arenas, as is usual for
    # threaded Python servers) makes it flat: 135.1 -> 135.5 MiB. Without these settings
    # the test passes alone but failed under the loaded full suite (+12%).
    malloc = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    server = start_server(repo, "--model-control-mode", "explicit", env=malloc)
    assert server.process is not None
    pid = server.process.pid
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 64],
                        "data": x.ravel().tolist()}]}  # fmt: skip

    def cycle(client: httpx.Client) -> None:
        assert client.post(f"{server.url}/v2/repository/models/mlp/load").status_code == 200
        assert client.post(f"{server.url}/v2/models/mlp/infer", json=body).status_code == 200
        assert client.post(f"{server.url}/v2/repository/models/mlp/unload").status_code == 200

    # RSS is sampled with the model unloaded after every cycle; glibc's heap makes single
    # samples swing by ~10% either way, so medians compare the warm state with the end
    with httpx.Client(timeout=60.0) as client:
        warm = []
        for _ in range(10):  # warm-up: allocator arenas, ORT's one-time state
            cycle(client)
            warm.append(rss_bytes(pid))
        after = []
        for _ in range(50):
            cycle(client)
            after.append(rss_bytes(pid))
    start = statistics.median(warm[2:])
    end = statistics.median(after[-5:])
    print(
        f"RSS unloaded: warm median {start / 2**20:.1f} MiB, after 50 cycles (median of the "
        f"last 5) {end / 2**20:.1f} MiB; samples {[round(r / 2**20) for r in after]}"
    )
    assert end <= start * 1.10, (start, end)
    assert os.path.exists(f"/proc/{pid}")
