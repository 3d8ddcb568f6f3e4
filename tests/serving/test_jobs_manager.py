"""The job manager with real worker processes: publish, failures, budget, cancel, restart."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from serving.errors import Conflict, InvalidInput, QueueFull
from serving.jobs import JobManager
from serving.jobs.records import JobRecord
from serving.jobs.runner import WorkerProcess, process_alive
from serving.model_config import read_config
from serving.repository import ModelRepository
from tests.models import scaled_model, write_model
from tests.serving.test_jobs_fakes import ENGINE_SCALE
from tests.serving.test_jobs_multipart import chunked, multipart

FAKES = "tests.serving.test_jobs_fakes"


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256): byte-for-byte comparisons."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Harness:
    def __init__(self, tmp_path: Path, fake: str = "copy_optimizer", **options: Any) -> None:
        self.repo_root = tmp_path / "repository"
        self.repo_root.mkdir(exist_ok=True)
        self.repository = ModelRepository(self.repo_root)
        self.jobs_dir = tmp_path / "jobs"
        self.reloaded: list[str] = []
        self.reload_error: Exception | None = None
        options.setdefault("poll_interval_s", 0.05)
        self.manager = JobManager(
            self.repository,
            self.jobs_dir,
            reload=self.reload,
            entrypoint=f"{FAKES}:{fake}",
            **options,
        )

    async def reload(self, name: str) -> None:
        self.reloaded.append(name)
        if self.reload_error is not None:
            raise self.reload_error

    async def submit(
        self,
        request: dict[str, Any] | None = None,
        model: tuple[str, bytes] | None = None,
        calibration: tuple[str, bytes] | None = None,
    ) -> JobRecord:
        files = {"model": model or ("model.onnx", scaled_model(2.0))}
        if calibration:
            files["calibration"] = calibration
        body, ctype = multipart({"request": json.dumps(request or {"name": "scaled"})}, files)
        return await self.manager.submit_upload(chunked(body), ctype, len(body))

    async def wait(
        self, job_id: str, until: Callable[[JobRecord], bool] | None = None, timeout: float = 60
    ) -> JobRecord:
        until = until or (lambda r: r.done)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.manager.get(job_id)
            if until(record):
                return record
            await asyncio.sleep(0.05)
        raise AssertionError(f"job {job_id} stuck: {self.manager.get(job_id)}")


def run(harness: Harness, body: Callable[[Harness], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with harness.manager:
            return await body(harness)

    return asyncio.run(main())


def infer(model_file: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# -- success ------------------------------------------------------------------------------
def test_success_publishes_original_then_winner(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    original = scaled_model(2.0)

    async def body(h: Harness) -> JobRecord:
        record = await h.submit(
            {"name": "scaled", "batch_size": 4, "time_budget_s": 60},
            calibration=("texts.txt", b"one\ntwo\n"),
        )
        assert record.state == "queued"
        return await h.wait(record.id)

    record = run(h, body)
    assert record.state == "succeeded", record.error
    assert (record.published_version, record.source_version) == (2, 1)
    assert (record.passes_done, record.passes_total) == (3, 3)
    assert record.stage == "done"
    assert record.fraction == 1.0
    assert record.report["source_version"] == 1
    assert record.report["job_id"] == record.id
    assert record.report["calibration"] == "one\ntwo\n"
    assert record.report["request"]["batch_size"] == 4
    assert h.reloaded == ["scaled"]
    model_dir = h.repo_root / "scaled"
    assert (model_dir / "1" / "model.onnx").read_bytes() == original
    report = json.loads((model_dir / "2" / "report.json").read_text())
    assert report["source_version"] == 1
    assert (model_dir / "2" / "report.png").read_bytes().startswith(b"\x89PNG")
    config = read_config(model_dir)
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert config.HasField("dynamic_batching")
    entry = h.repository.entry("scaled")
    assert entry.ok, entry.error
    assert [v.version for v in entry.versions] == [2]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(infer(model_dir / "1" / "model.onnx", x), 2 * x)
    np.testing.assert_allclose(
        infer(model_dir / "2" / "model.onnx", x), 2 * ENGINE_SCALE * x, rtol=1e-6
    )
    # the record survives on disk; the upload and scratch files are gone once published
    on_disk = json.loads((h.jobs_dir / record.id / "job.json").read_text())
    assert on_disk["state"] == "succeeded"
    assert on_disk["published_version"] == 2
    assert sorted(p.name for p in (h.jobs_dir / record.id).iterdir()) == [
        "job.json",
        "progress.jsonl",
        "result.json",
        "spec.json",
        "worker.log",
    ]


def test_existing_model_with_the_same_bytes_gets_only_the_winner(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    write_model(h.repo_root, "scaled", scaled_model(2.0), versions=(1, 2))

    async def body(h: Harness) -> JobRecord:
        return await h.wait((await h.submit()).id)

    record = run(h, body)
    assert record.state == "succeeded", record.error
    assert (record.published_version, record.source_version) == (3, 2)
    assert h.repository.version_numbers("scaled") == [1, 2, 3]
    assert not (h.repo_root / "scaled" / "config.pbtxt").exists(), "existing config untouched"


# -- failures leave the repository alone --------------------------------------------------
@pytest.mark.parametrize(
    ("fake", "message"),
    [
        ("sigkill_optimizer", "killed by SIGKILL"),
        ("exit_optimizer", "exit code 7.*native crash imminent"),
        ("invalid_optimizer", "no inputs the pipeline can feed"),
        ("out_of_time_optimizer", "Cancelled: time budget exhausted"),
        ("bad_platform_optimizer", "publishing failed.*pytorch_libtorch"),
    ],
)
def test_failed_job_changes_nothing(tmp_path: Path, fake: str, message: str) -> None:
    h = Harness(tmp_path, fake)
    write_model(h.repo_root, "scaled", scaled_model(3.0), model_config={"max_batch_size": 4})
    before = tree_digest(h.repo_root)

    async def body(h: Harness) -> JobRecord:
        return await h.wait((await h.submit()).id)

    record = run(h, body)
    assert record.state == "failed"
    assert record.error
    assert re.search(message, record.error), record.error
    assert tree_digest(h.repo_root) == before
    assert record.published_version is None
    assert (h.jobs_dir / record.id / "upload" / "model.onnx").is_file(), "upload kept"
    assert not (h.jobs_dir / record.id / "work").exists(), "scratch files removed"
    assert h.reloaded == []


def test_memory_limit_turns_an_oom_into_a_job_error(tmp_path: Path) -> None:
    h = Harness(tmp_path, "hungry_optimizer", memory_limit_bytes=2 << 30)

    async def body(h: Harness) -> JobRecord:
        return await h.wait((await h.submit()).id)

    record = run(h, body)
    assert record.state == "failed"
    assert "MemoryError" in record.error
    assert not (h.repo_root / "scaled").exists()


def test_failed_reload_takes_the_new_versions_back(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.reload_error = RuntimeError("engine would not load")

    async def body(h: Harness) -> JobRecord:
        return await h.wait((await h.submit()).id)

    record = run(h, body)
    assert record.state == "failed"
    assert "did not load" in record.error
    assert "engine would not load" in record.error
    assert not (h.repo_root / "scaled").exists()


def test_time_budget_overrun_kills_the_worker(tmp_path: Path) -> None:
    h = Harness(tmp_path, "stubborn_optimizer", kill_margin_s=0.5)

    async def body(h: Harness) -> tuple[JobRecord, float, int]:
        record = await h.submit({"name": "scaled", "time_budget_s": 1})
        running = await h.wait(record.id, lambda r: r.worker_pid is not None)
        started = time.monotonic()
        done = await h.wait(record.id)
        return done, time.monotonic() - started, running.worker_pid

    record, elapsed, pid = run(h, body)
    assert record.state == "failed"
    assert "time budget of 1 s" in record.error
    assert elapsed < 15
    assert not process_alive(pid)
    assert not (h.repo_root / "scaled").exists()


# -- cancel -------------------------------------------------------------------------------
@pytest.mark.parametrize("fake", ["slow_optimizer", "stubborn_optimizer"])
def test_cancel_running_job(tmp_path: Path, fake: str) -> None:
    h = Harness(tmp_path, fake, cancel_grace_s=0.5)

    async def body(h: Harness) -> tuple[JobRecord, int]:
        record = await h.submit()
        running = await h.wait(record.id, lambda r: r.stage == "search")
        assert running.state == "running"
        oom_score = Path(f"/proc/{running.worker_pid}/oom_score_adj").read_text().strip()
        assert oom_score == "1000", "the OOM killer picks the worker, not the server"
        assert running.fraction is not None
        cancelled = await h.manager.cancel(record.id)
        with pytest.raises(Conflict, match="already cancelled"):
            await h.manager.cancel(record.id)
        return cancelled, running.worker_pid

    record, pid = run(h, body)
    assert record.state == "cancelled"
    assert record.finished_at is not None
    assert not process_alive(pid)
    assert not (h.repo_root / "scaled").exists()


def test_queue_bounds_and_cancelling_a_queued_job(tmp_path: Path) -> None:
    h = Harness(tmp_path, "slow_optimizer", max_concurrent=1, max_queued=1)

    async def body(h: Harness) -> list[JobRecord]:
        first = await h.submit({"name": "a"})
        await h.wait(first.id, lambda r: r.state == "running")
        second = await h.submit({"name": "b"})
        with pytest.raises(QueueFull, match="limit 1"):
            await h.submit({"name": "c"})
        assert h.manager.get(second.id).state == "queued"
        await h.manager.cancel(second.id)
        await h.manager.cancel(first.id)
        return h.manager.list()

    records = run(h, body)
    assert [(r.model, r.state) for r in records] == [("a", "cancelled"), ("b", "cancelled")]
    assert len(list(h.jobs_dir.iterdir())) == 2, "the refused upload left no folder"


# -- validation at submit -----------------------------------------------------------------
def test_refused_uploads_leave_no_job(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    marker = tmp_path / "PWNED"

    async def body(h: Harness) -> None:
        with pytest.raises(InvalidInput, match="name"):
            await h.submit({"name": "../escape"})
        with pytest.raises(InvalidInput, match="batch_size"):
            await h.submit({"name": "ok", "batch_size": 0})
        with pytest.raises(InvalidInput, match="pickle"):
            await h.submit(model=("model.pt", b"\x80\x04cos\nsystem\n"))
        with pytest.raises(InvalidInput, match="not a valid ONNX"):
            await h.submit(model=("model.onnx", b"garbage"))
        buffer = io.BytesIO()
        np.savez(buffer, x=np.array([{"a": 1}], dtype=object))
        with pytest.raises(InvalidInput, match="object arrays"):
            await h.submit(calibration=("calib.npz", buffer.getvalue()))

    run(h, body)
    assert h.manager.list() == []
    assert list(h.jobs_dir.iterdir()) == []
    assert not marker.exists()


# -- restart ------------------------------------------------------------------------------
def test_restart_fails_the_running_job_and_resumes_the_queue(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    jobs = h.manager.store
    # what a killed server leaves: a record 'running' with a live worker, and a queued job
    crashed = JobRecord(id="00000000001aaaaaaaaaaaa", model="lost", state="running")
    crashed.source = {"kind": "onnx", "path": "upload/model.onnx"}
    job_dir = jobs.job_dir(crashed.id)
    (job_dir / "upload").mkdir(parents=True)
    (job_dir / "upload" / "model.onnx").write_bytes(scaled_model(2.0))
    worker = WorkerProcess(
        job_dir,
        {
            "source": str(job_dir / "upload" / "model.onnx"),
            "request": {"name": "lost"},
            "entrypoint": f"{FAKES}:stubborn_optimizer",
            "workdir": str(job_dir / "work"),
        },
    )
    crashed.worker_pid = worker.start()
    jobs.add(crashed)
    queued = JobRecord(id="00000000002bbbbbbbbbbbb", model="later", request={"name": "later"})
    queued.source = {"kind": "onnx", "path": "upload/model.onnx"}
    (jobs.job_dir(queued.id) / "upload").mkdir(parents=True)
    (jobs.job_dir(queued.id) / "upload" / "model.onnx").write_bytes(scaled_model(5.0))
    jobs.add(queued)
    restarted = Harness(tmp_path)

    async def body(h: Harness) -> tuple[JobRecord, JobRecord]:
        return h.manager.get(crashed.id), await h.wait(queued.id)

    lost, later = run(restarted, body)
    assert lost.state == "failed"
    assert "server restarted" in lost.error
    assert worker.process.wait(timeout=10) != 0, "the orphaned worker was stopped"
    assert (job_dir / "upload" / "model.onnx").is_file()
    assert later.state == "succeeded", later.error
    assert restarted.repository.version_numbers("later") == [1, 2]
    assert not (tmp_path / "repository" / "lost").exists()
    assert os.path.exists(job_dir / "job.json")


def test_jobs_run_side_by_side_up_to_the_limit(tmp_path: Path) -> None:
    h = Harness(tmp_path, "slow_optimizer", max_concurrent=2)

    async def body(h: Harness) -> list[str]:
        jobs = [await h.submit({"name": f"m{i}"}) for i in range(3)]
        for job in jobs[:2]:
            await h.wait(job.id, lambda r: r.stage == "search")
        states = [h.manager.get(job.id).state for job in jobs]
        for job in jobs:
            await h.manager.cancel(job.id)
        return states

    assert run(h, body) == ["running", "running", "queued"]
