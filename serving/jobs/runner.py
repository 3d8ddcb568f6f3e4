"""The server's handle on one worker process: start, read progress, stop, judge the outcome.

The worker runs in its own session (process group), so stopping it also stops anything it
started. Nothing here blocks for long: the job manager polls from the event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.jobs.worker import (
    ERROR_FILE,
    EXIT_ORPHANED,
    LOG_FILE,
    PROGRESS_FILE,
    RESULT_FILE,
    SPEC_FILE,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class WorkerOutcome:
    """How a worker ended: ``result`` on success, else ``error`` (and whether cancelled)."""

    result: dict[str, Any] | None = None
    error: str | None = None
    cancelled: bool = False
    client_error: bool = False

    @property
    def ok(self) -> bool:
        return self.result is not None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class WorkerProcess:
    """One ``python -m serving.jobs.worker <job dir>`` child process."""

    def __init__(self, job_dir: Path, spec: dict[str, Any]) -> None:
        self.job_dir = job_dir
        self.spec = spec
        self.process: subprocess.Popen[bytes] | None = None
        self._progress_offset = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> int:
        """Write the spec and start the worker; returns its pid."""
        for name in (PROGRESS_FILE, RESULT_FILE, ERROR_FILE):
            (self.job_dir / name).unlink(missing_ok=True)
        spec = {**self.spec, "parent_pid": os.getpid()}
        (self.job_dir / SPEC_FILE).write_text(json.dumps(spec, indent=1), encoding="utf-8")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        with (self.job_dir / LOG_FILE).open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "serving.jobs.worker", str(self.job_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.job_dir),
                env=env,
                start_new_session=True,
            )
        return self.process.pid

    def poll(self) -> int | None:
        """The exit code once the worker has ended, else None."""
        return self.process.poll() if self.process is not None else None

    def read_progress(self) -> list[dict[str, Any]]:
        """Progress events written since the last call (a partial last line waits)."""
        path = self.job_dir / PROGRESS_FILE
        try:
            with path.open("rb") as handle:
                handle.seek(self._progress_offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._progress_offset += end + 1
        events = []
        for line in data[: end + 1].splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the worker's process group (ignored if it is gone)."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the worker's process group and reap it."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def outcome(self, returncode: int) -> WorkerOutcome:
        """Judge a finished worker by its files and exit code."""
        result_path = self.job_dir / RESULT_FILE
        error_path = self.job_dir / ERROR_FILE
        if returncode == 0 and result_path.is_file():
            return WorkerOutcome(result=json.loads(result_path.read_text(encoding="utf-8")))
        if error_path.is_file():
            with contextlib.suppress(ValueError, OSError):
                data = json.loads(error_path.read_text(encoding="utf-8"))
                return WorkerOutcome(
                    error=str(data.get("error") or "worker failed"),
                    cancelled=bool(data.get("cancelled")),
                    client_error=bool(data.get("client_error")),
                )
        if returncode < 0:
            name = signal_name(-returncode)
            hint = " (out of memory, or killed by an operator)" if name == "SIGKILL" else ""
            reason = f"worker process was killed by {name}{hint}"
        elif returncode == EXIT_ORPHANED:
            reason = "worker process stopped because the server went away"
        else:
            reason = f"worker process crashed with exit code {returncode}"
        tail = self.log_tail(5)
        if tail:
            reason += "; last log lines: " + " | ".join(tail)
        return WorkerOutcome(error=reason)

    def log_tail(self, lines: int = 20) -> list[str]:
        return log_tail(self.job_dir / LOG_FILE, lines)


def log_tail(path: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last ``lines`` non-empty lines of a log file (reads at most ``max_bytes``)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace")
    kept: deque[str] = deque(maxlen=lines)
    for line in text.splitlines():
        if line.strip():
            kept.append(line[:500])
    return list(kept)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_orphan(pid: int, job_dir: Path) -> bool:
    """Kill a worker left by a previous server run, if ``pid`` is still that worker."""
    try:
        import psutil

        process = psutil.Process(pid)
        cmdline = process.cmdline()
    except Exception:
        return False
    if "serving.jobs.worker" not in cmdline or str(job_dir) not in cmdline:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True
