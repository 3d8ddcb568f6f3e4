"""Job lifetime against a real server: cancel, a worker killed by SIGKILL, a server restart.

The worker runs the misbehaving entry points of ``tests.serving.test_jobs_fakes`` (selected
with ``SLIMSERVE_JOB_ENTRYPOINT``) so the timing is deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from serving.jobs.runner import process_alive
from tests.e2e.helpers import infer_input
from tests.e2e.server import RemoteServer
from tests.models import basic_repository, scaled_model

FAKES = "tests.serving.test_jobs_fakes"


def env_for(tmp_path: Path, fake: str) -> dict[str, str]:
    return {
        "SLIMSERVE_JOBS_DIR": str(tmp_path / "jobs"),
        "SLIMSERVE_JOB_ENTRYPOINT": f"{FAKES}:{fake}",
    }


def submit(server: RemoteServer, name: str = "scaled") -> dict[str, Any]:
    response = httpx.post(
        f"{server.url}/v2/optimize",
        files={"model": ("model.onnx", scaled_model(2.0))},
        data={"request": json.dumps({"name": name})},
    )
    assert response.status_code == 202, response.text
    return response.json()


def wait_for(
    server: RemoteServer, url: str, until: Callable[[dict[str, Any]], bool], timeout_s: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}{url}").json()
        if until(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job never reached the expected state: {job}")


def tree_digest(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def serving_add_sub(server: RemoteServer) -> None:
    a = np.full((1, 16), 3, np.float32)
    result = server.client().infer("add_sub", [infer_input("INPUT0", a), infer_input("INPUT1", a)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)


def test_cancel_a_running_job(tmp_path: Path, start_server: Callable[..., RemoteServer]) -> None:
    repo = basic_repository(tmp_path / "repository")
    server = start_server(repo, env=env_for(tmp_path, "slow_optimizer"))
    before = tree_digest(repo)
    created = submit(server)
    running = wait_for(server, created["url"], lambda j: j["stage"] == "search")
    assert running["state"] == "running"
    assert running["candidate"] == "slow"
    response = httpx.delete(f"{server.url}{created['url']}", timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    again = httpx.delete(f"{server.url}{created['url']}")
    assert again.status_code == 409
    assert "already cancelled" in again.json()["error"]
    assert not process_alive(running["worker_pid"])
    listed = httpx.get(f"{server.url}/v2/optimize/jobs").json()["jobs"]
    assert [(j["id"], j["state"]) for j in listed] == [(created["id"], "cancelled")]
    assert tree_digest(repo) == before
    serving_add_sub(server)
    purged = httpx.delete(f"{server.url}{created['url']}?purge=true")
    assert purged.status_code == 200, purged.text
    assert httpx.get(f"{server.url}{created['url']}").status_code == 404
    assert not (tmp_path / "jobs" / created["id"]).exists()


def test_worker_killed_by_sigkill_fails_the_job_only(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = basic_repository(tmp_path / "repository")
    server = start_server(repo, env=env_for(tmp_path, "stubborn_optimizer"))
    before = tree_digest(repo)
    created = submit(server, name="add_sub")
    running = wait_for(server, created["url"], lambda j: j["stage"] == "search")
    os.kill(running["worker_pid"], signal.SIGKILL)
    job = wait_for(server, created["url"], lambda j: j["state"] != "running")
    assert job["state"] == "failed"
    assert "SIGKILL" in job["error"]
    assert tree_digest(repo) == before
    assert (tmp_path / "jobs" / created["id"] / "upload" / "model.onnx").is_file()
    serving_add_sub(server)


def test_job_records_survive_a_server_crash(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> None:
    repo = basic_repository(tmp_path / "repository")
    env = env_for(tmp_path, "stubborn_optimizer")
    first = RemoteServer(repo, env=env).start()
    try:
        created = submit(first)
        running = wait_for(first, created["url"], lambda j: j["stage"] == "search")
        queued = submit(first, name="second")
        first.process.kill()  # the server dies without any cleanup
        first.process.wait()
    finally:
        first.stop()
    worker = running["worker_pid"]
    deadline = time.monotonic() + 15
    while process_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(worker), "the orphaned worker stopped with its server"

    second = start_server(repo, env=env_for(tmp_path, "copy_optimizer"))
    job = httpx.get(f"{second.url}{created['url']}").json()
    assert job["state"] == "failed"
    assert "server restarted" in job["error"]
    assert (tmp_path / "jobs" / created["id"] / "upload" / "model.onnx").is_file()
    resumed = wait_for(
        second, queued["url"], lambda j: j["state"] != "queued" and j["state"] != "running"
    )
    assert resumed["state"] == "succeeded", resumed["error"]
    assert second.client().is_model_ready("second")
    assert not (repo / "scaled").exists()
    serving_add_sub(second)
