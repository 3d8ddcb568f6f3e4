"""The job manager: accepts uploads, queues jobs, supervises worker processes, publishes.

At most ``max_concurrent`` workers run at once; up to ``max_queued`` more wait (beyond that
an upload is refused with 503). Each running job is watched from the event loop: progress
is read from the worker's event file, the time budget is enforced by killing the worker
(budget plus a margin), and ``cancel`` stops it (SIGTERM, then SIGKILL). A finished job is
published into the repository and the model reloaded (then its upload and scratch files are
removed); on any failure the repository is left as it was, the upload is kept, and the record
says why. Records survive a restart; a job that was running when
the server died is marked failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from serving.archive import ArchiveLimits
from serving.errors import Conflict, QueueFull, SlimServeError
from serving.jobs.publish import publish_result, rollback
from serving.jobs.records import LOG_TAIL_LINES, JobRecord, JobStore, new_job_id
from serving.jobs.request import parse_request
from serving.jobs.runner import WorkerProcess, kill_orphan, log_tail
from serving.jobs.source import check_calibration, prepare_model
from serving.jobs.upload import drain_body, receive_upload
from serving.jobs.worker import DEFAULT_ENTRYPOINT, LOG_FILE
from serving.repository import ModelRepository

logger = logging.getLogger(__name__)

Reload = Callable[[str], Awaitable[Any]]
PROGRESS_KEYS = ("stage", "message", "fraction", "candidate", "passes_done", "passes_total")
ALIASES = {"done": "passes_done", "total": "passes_total"}
PUBLISH_GRACE_S = 120.0
CANDIDATE_COUNT = re.compile(r"candidate (\d+)/(\d+)")


class JobManager:
    """Owns the jobs folder, the queue and the worker processes."""

    def __init__(
        self,
        repository: ModelRepository,
        jobs_dir: Path,
        *,
        reload: Reload | None = None,
        max_concurrent: int = 1,
        max_queued: int = 16,
        max_upload_bytes: int = 2 << 30,
        archive_limits: ArchiveLimits | None = None,
        entrypoint: str = DEFAULT_ENTRYPOINT,
        max_job_seconds: float = 6 * 3600,
        kill_margin_s: float = 30.0,
        cancel_grace_s: float = 5.0,
        poll_interval_s: float = 0.2,
        memory_limit_bytes: int | None = None,
    ) -> None:
        self.repository = repository
        self.store = JobStore(jobs_dir)
        self.reload = reload
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.max_upload_bytes = max_upload_bytes
        self.archive_limits = archive_limits or ArchiveLimits(
            max_total_bytes=max(4 * max_upload_bytes, 1 << 20)
        )
        self.entrypoint = entrypoint
        self.max_job_seconds = max_job_seconds
        self.kill_margin_s = kill_margin_s
        self.cancel_grace_s = cancel_grace_s
        self.poll_interval_s = poll_interval_s
        self.memory_limit_bytes = memory_limit_bytes
        self._queue: deque[str] = deque()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()
        self._publish_lock = asyncio.Lock()
        self._stopping = False

    # -- lifetime ----------------------------------------------------------------------
    async def start(self) -> None:
        """Load the records; fail jobs a dead server left running; resume the queue."""
        self._stopping = False
        records = self.store.load()
        await asyncio.to_thread(self.store.remove_incomplete)
        for record in records:
            if record.state == "running":
                job_dir = self.store.job_dir(record.id)
                if record.worker_pid:
                    await asyncio.to_thread(kill_orphan, record.worker_pid, job_dir)
                self._finish(
                    record,
                    "failed",
                    "server restarted while the job was running; the upload is kept, "
                    "submit it again",
                )
            elif record.state == "queued":
                self._queue.append(record.id)
        self._dispatch()

    async def stop(self) -> None:
        """Stop running workers (their jobs fail: the server shut down); keep the queue."""
        self._stopping = True
        tasks = list(self._running.values())
        publishing = [
            task
            for job_id, task in self._running.items()
            if self.store.get(job_id).stage == "publishing"
        ]
        if publishing:  # let a publish finish rather than leave half of it behind
            await asyncio.wait(publishing, timeout=PUBLISH_GRACE_S)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._queue.clear()

    async def __aenter__(self) -> JobManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- queries -----------------------------------------------------------------------
    def list(self) -> list[JobRecord]:
        return self.store.all()

    def get(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record.state == "running":
            record.log_tail = log_tail(self.store.job_dir(job_id) / LOG_FILE, LOG_TAIL_LINES)
        return record

    # -- submitting --------------------------------------------------------------------
    def _check_capacity(self) -> None:
        if len(self._running) >= self.max_concurrent and len(self._queue) >= self.max_queued:
            raise QueueFull(
                f"{len(self._running)} optimization job(s) running and {len(self._queue)} "
                f"queued (limit {self.max_queued}); retry when one has finished"
            )

    async def submit_upload(
        self,
        chunks: AsyncIterator[bytes],
        content_type: str | None,
        content_length: int | None = None,
        *,
        expects_continue: bool = False,
    ) -> JobRecord:
        """Receive a multipart upload, validate it, and queue its job (the upload is kept)."""
        try:
            self._check_capacity()
        except QueueFull:
            if not expects_continue:
                await drain_body(chunks.__aiter__())
            raise
        job_id = new_job_id()
        job_dir = self.store.job_dir(job_id)
        upload_dir = job_dir / "upload"
        try:
            form = await receive_upload(
                chunks,
                content_type,
                upload_dir,
                max_bytes=self.max_upload_bytes,
                content_length=content_length,
                expects_continue=expects_continue,
            )
            options = parse_request(form.fields.get("request"))
            saved = form.files["model"]
            source = await asyncio.to_thread(prepare_model, saved, upload_dir, self.archive_limits)
            calibration = None
            if "calibration" in form.files:
                calibration = await asyncio.to_thread(check_calibration, form.files["calibration"])
            self._check_capacity()
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        record = JobRecord(
            id=job_id,
            model=options["name"],
            request=options,
            source={
                "kind": source.kind,
                "filename": saved.filename,
                "bytes": saved.size,
                "path": str(source.path.relative_to(job_dir)),
                "calibration": str(calibration.relative_to(job_dir)) if calibration else None,
            },
            stage="queued",
        )
        self.store.add(record)
        self._queue.append(job_id)
        logger.info("job %s queued: optimize %s (%s)", job_id, record.model, source.kind)
        self._dispatch()
        return record

    # -- cancelling --------------------------------------------------------------------
    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job; waits until its worker has stopped."""
        record = self.store.get(job_id)
        if record.done:
            raise Conflict(f"job '{job_id}' already {record.state}; nothing to cancel")
        if record.stage == "publishing":
            raise Conflict(f"job '{job_id}' is publishing its result; too late to cancel")
        if job_id in self._queue:
            self._queue.remove(job_id)
            self._finish(record, "cancelled", "cancelled by client before it started")
            return record
        self._cancel_requested.add(job_id)
        task = self._running.get(job_id)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), self.cancel_grace_s + 15)
        return record

    async def purge(self, job_id: str) -> JobRecord:
        """Cancel the job if it is still active, then delete its record and files."""
        record = self.store.get(job_id)
        if not record.done:
            await self.cancel(job_id)
        if not record.done or job_id in self._running:
            raise Conflict(f"job '{job_id}' is still stopping; try again in a moment")
        await asyncio.to_thread(self.store.remove, job_id)
        return record

    # -- running -----------------------------------------------------------------------
    def _dispatch(self) -> None:
        while not self._stopping and self._queue and len(self._running) < self.max_concurrent:
            job_id = self._queue.popleft()
            self._running[job_id] = asyncio.get_running_loop().create_task(
                self._run(job_id), name=f"job-{job_id}"
            )

    def _finish(self, record: JobRecord, state: str, error: str | None = None) -> None:
        record.state = state  # type: ignore[assignment]
        record.error = error
        record.finished_at = time.time()
        if state != "succeeded":
            record.stage = state
        with contextlib.suppress(OSError):
            record.log_tail = log_tail(self.store.job_dir(record.id) / LOG_FILE, LOG_TAIL_LINES)
        self.store.save(record)
        logger.info("job %s %s%s", record.id, state, f": {error}" if error else "")

    def _spec(self, record: JobRecord, job_dir: Path) -> dict[str, Any]:
        calibration = record.source.get("calibration")
        return {
            "source": str(job_dir / record.source["path"]),
            "kind": record.source.get("kind"),
            "request": record.request,
            "calibration": str(job_dir / calibration) if calibration else None,
            "entrypoint": self.entrypoint,
            "workdir": str(job_dir / "work"),
            "memory_limit_bytes": self.memory_limit_bytes,
        }

    async def _run(self, job_id: str) -> None:
        """Run one job to its end; the record turns final only after the cleanup."""
        record = self.store.get(job_id)
        holder: list[WorkerProcess] = []
        interrupted = False
        try:
            state, error = await self._attempt(record, holder)
        except asyncio.CancelledError:
            interrupted = True
            state, error = "failed", "server shut down while the job was running; submit again"
        except Exception as exc:
            logger.exception("job %s failed", job_id)
            state, error = "failed", f"{type(exc).__name__}: {exc}"
        try:
            if holder and holder[0].poll() is None:
                await asyncio.to_thread(holder[0].kill)
            await asyncio.to_thread(self._remove_scratch, job_id, upload=state == "succeeded")
        finally:
            self._finish(record, state, error)
            self._running.pop(job_id, None)
            self._cancel_requested.discard(job_id)
            self._dispatch()
        if interrupted:
            raise asyncio.CancelledError

    async def _attempt(
        self, record: JobRecord, holder: list[WorkerProcess]
    ) -> tuple[str, str | None]:
        """Start the worker, watch it, publish its result; returns (final state, error)."""
        job_dir = self.store.job_dir(record.id)
        await asyncio.to_thread(shutil.rmtree, job_dir / "work", True)
        worker = WorkerProcess(job_dir, self._spec(record, job_dir))
        holder.append(worker)
        record.worker_pid = await asyncio.to_thread(worker.start)
        record.state, record.stage, record.started_at = "running", "starting", time.time()
        self.store.save(record)
        state, error = await self._supervise(record, worker)
        if state != "succeeded":
            return state, error
        result = worker.outcome(0).result
        if result is None:
            return "failed", "the worker reported success but wrote no result"
        return await self._publish(record, result)

    def _budget(self, record: JobRecord) -> float:
        budget = record.request.get("time_budget_s") or self.max_job_seconds
        return float(budget) + max(self.kill_margin_s, 0.1 * float(budget))

    async def _supervise(self, record: JobRecord, worker: WorkerProcess) -> tuple[str, str | None]:
        """Watch the worker until it ends; returns (state, error)."""
        allowed = self._budget(record)
        deadline = time.monotonic() + allowed
        last_save = 0.0
        while True:
            returncode = worker.poll()
            changed = self._apply_progress(record, worker.read_progress())
            now = time.monotonic()
            if changed and now - last_save > 0.5:
                record.log_tail = worker.log_tail(LOG_TAIL_LINES)
                self.store.save(record)
                last_save = now
            if returncode is not None:
                break
            if record.id in self._cancel_requested:
                await self._stop_worker(worker)
                return "cancelled", "cancelled by client"
            if now > deadline:
                await asyncio.to_thread(worker.kill)
                budget = record.request.get("time_budget_s")
                what = f"its time budget of {budget:g} s" if budget else "the server's job limit"
                return "failed", f"job overran {what} (killed after {allowed:g} s)"
            await asyncio.sleep(self.poll_interval_s)
        self._apply_progress(record, worker.read_progress())
        if record.id in self._cancel_requested:
            return "cancelled", "cancelled by client"
        outcome = worker.outcome(returncode)
        if outcome.ok:
            return "succeeded", None
        if outcome.cancelled:
            return "cancelled", outcome.error
        return "failed", outcome.error

    async def _stop_worker(self, worker: WorkerProcess) -> None:
        """SIGTERM (the pipeline stops at its next check), then SIGKILL after the grace time."""
        worker.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.cancel_grace_s
        while worker.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if worker.poll() is None:
            await asyncio.to_thread(worker.kill)

    @staticmethod
    def _apply_progress(record: JobRecord, events: list[dict[str, Any]]) -> bool:
        """Copy progress fields from the worker's events onto the record.

        ``passes_done``/``passes_total`` come from the event when it has them, else from a
        ``"candidate i/N"`` message (candidates finished / to try).
        """
        for event in events:
            for key, value in event.items():
                key = ALIASES.get(key, key)
                if key in PROGRESS_KEYS:
                    setattr(record, key, value)
            counted = CANDIDATE_COUNT.search(str(event.get("message") or ""))
            if counted and "passes_done" not in event and "done" not in event:
                record.passes_done = int(counted.group(1)) - 1
                record.passes_total = int(counted.group(2))
        return bool(events)

    async def _publish(self, record: JobRecord, result: dict[str, Any]) -> tuple[str, str | None]:
        """Publish the result and reload the model; on failure take the versions back."""
        record.stage, record.message = "publishing", "publishing the optimized model"
        self.store.save(record)
        async with self._publish_lock:
            try:
                published = await asyncio.to_thread(
                    publish_result, self.repository, record.model, result, job_id=record.id
                )
            except SlimServeError as exc:
                return "failed", f"publishing failed: {exc}"
            if self.reload is not None:
                try:
                    await self.reload(record.model)
                except Exception as exc:
                    logger.exception("job %s: reloading %s failed", record.id, record.model)
                    await asyncio.to_thread(rollback, self.repository, published)
                    with contextlib.suppress(Exception):
                        await self.reload(record.model)
                    return "failed", (
                        f"the optimized version did not load ({type(exc).__name__}: {exc}); "
                        "it was taken out of the repository again"
                    )
        record.published_version = published.version
        record.source_version = published.source_version
        record.report = published.report
        record.fraction = 1.0
        if record.passes_total is not None:
            record.passes_done = record.passes_total
        record.stage, record.message = "done", f"published as version {published.version}"
        return "succeeded", None

    def _remove_scratch(self, job_id: str, *, upload: bool) -> None:
        """Drop a finished job's scratch files, and its upload once published."""
        job_dir = self.store.job_dir(job_id)
        for folder in ("work", "upload") if upload else ("work",):
            shutil.rmtree(job_dir / folder, ignore_errors=True)
