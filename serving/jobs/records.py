"""Job records: one JSON file per job (``<jobs dir>/<id>/job.json``), written atomically.

The store keeps the records in memory and writes each change through to disk, so a job's
state, progress and outcome survive a server restart.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from serving.errors import NotFound
from serving.fileutil import atomic_write_text, confined

logger = logging.getLogger(__name__)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
RECORD_FILE = "job.json"
LOG_TAIL_LINES = 20


@dataclass
class JobRecord:
    """Everything a client can learn about one optimization job."""

    id: str
    model: str
    state: JobState = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    request: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    stage: str | None = None
    message: str | None = None
    fraction: float | None = None
    candidate: str | None = None
    passes_done: int | None = None
    passes_total: int | None = None
    log_tail: list[str] = field(default_factory=list)
    error: str | None = None
    published_version: int | None = None
    source_version: int | None = None
    report: dict[str, Any] | None = None
    worker_pid: int | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The record without the bulky parts (report, log tail), for listings."""
        data = self.to_dict()
        data.pop("report")
        data.pop("log_tail")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def new_job_id() -> str:
    """A sortable, unguessable id: creation time in ms (hex) + 12 random hex digits."""
    return f"{int(time.time() * 1000):011x}{uuid.uuid4().hex[:12]}"


def valid_job_id(job_id: str) -> bool:
    return 8 <= len(job_id) <= 64 and all(c in "0123456789abcdef" for c in job_id)


class JobStore:
    """In-memory job records, written through to ``<root>/<id>/job.json``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()  # created with the first job, not before
        self._records: dict[str, JobRecord] = {}

    def job_dir(self, job_id: str) -> Path:
        """The folder of job ``job_id`` (validated, confined to the jobs folder)."""
        if not valid_job_id(job_id):
            raise NotFound(f"no optimization job '{job_id}'")
        return confined(self.root, job_id)

    def load(self) -> list[JobRecord]:
        """Read every record on disk (unreadable ones are logged and skipped)."""
        self._records.clear()
        if not self.root.is_dir():
            return []
        for child in sorted(self.root.iterdir()):
            path = child / RECORD_FILE
            if not (child.is_dir() and valid_job_id(child.name) and path.is_file()):
                continue
            try:
                record = JobRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("skipping unreadable job record %s: %s", path, exc)
                continue
            self._records[record.id] = record
        return self.all()

    def remove_incomplete(self) -> list[Path]:
        """Delete job folders without a record (uploads cut short by a crash)."""
        removed = []
        if self.root.is_dir():
            for child in self.root.iterdir():
                if (
                    child.is_dir()
                    and valid_job_id(child.name)
                    and not (child / RECORD_FILE).exists()
                ):
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child)
        return removed

    def add(self, record: JobRecord) -> None:
        self._records[record.id] = record
        self.save(record)

    def save(self, record: JobRecord) -> None:
        path = self.job_dir(record.id) / RECORD_FILE
        atomic_write_text(path, json.dumps(record.to_dict(), indent=1, default=str))

    def remove(self, job_id: str) -> None:
        """Forget a job and delete its folder (upload, logs, record)."""
        folder = self.job_dir(job_id)
        self._records.pop(job_id, None)
        shutil.rmtree(folder, ignore_errors=True)

    def get(self, job_id: str) -> JobRecord:
        record = self._records.get(job_id)
        if record is None:
            raise NotFound(f"no optimization job '{job_id}'")
        return record

    def all(self) -> list[JobRecord]:
        """Every record, oldest first."""
        return sorted(self._records.values(), key=lambda r: (r.created_at, r.id))
