"""``RemoteServer``: start ``python -m serving serve`` as a real subprocess for e2e tests.

Like vLLM's ``RemoteOpenAIServer``: binds port 0, reads the real port from the log, polls
``/v2/health/ready``, and on exit sends SIGTERM. A server that died is reported with its log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"Uvicorn running on http://([\d.]+):(\d+)")


class ServerDied(RuntimeError):
    """The server process exited when it should have been serving."""


class RemoteServer:
    """A slimserve server process serving ``repository``."""

    def __init__(
        self,
        repository: Path,
        *args: str,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 90.0,
        wait_ready: bool = True,
    ) -> None:
        self.repository = Path(repository)
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.wait_ready = wait_ready
        self.process: subprocess.Popen[bytes] | None = None
        self.terminated = False  # set once we sent SIGTERM (an exit is then expected)
        self.port: int | None = None
        fd, path = tempfile.mkstemp(prefix="slimserve-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        self._log_path = Path(path)

    # -- addresses ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """``host:port`` as ``tritonclient`` wants it."""
        return f"127.0.0.1:{self.port}"

    def client(self, **options: object):  # -> tritonclient.http.InferenceServerClient
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.address, **options)

    @property
    def log(self) -> str:
        return self._log_path.read_text(errors="replace")

    # -- lifetime ----------------------------------------------------------------------
    def start(self) -> RemoteServer:
        command = [
            sys.executable, "-m", "serving", "serve",
            "--repository", str(self.repository),
            "--port", "0",
            "--log-level", "info",
            *self.args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.ready_timeout_s
        self.port = self._wait_port(deadline)
        if self.wait_ready:
            self.wait_until_ready(deadline)
        return self

    def _check_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            raise ServerDied(f"server exited with code {code}; its log:\n{self.log}")

    def _wait_port(self, deadline: float) -> int:
        while time.monotonic() < deadline:
            self._check_alive()
            match = _LISTENING.search(self.log)
            if match:
                return int(match.group(2))
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"server did not start listening; its log:\n{self.log}")

    def wait_until_ready(self, deadline: float) -> None:
        """Poll ``/v2/health/ready`` until 200 (the initial model load is done)."""
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    if client.get(f"{self.url}/v2/health/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"server not ready after {self.ready_timeout_s}s; its log:\n{self.log}")

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown: drain, then exit)."""
        assert self.process is not None
        self.terminated = True
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait (SIGKILL after ``timeout_s``); the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> RemoteServer:
        """Start the server unless ``start()`` already did (``with RemoteServer(..).start():``)."""
        if self.process is not None and self.process.poll() is None:
            return self
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        died = self.process is not None and self.process.poll() is not None and not self.terminated
        code = self.stop()
        if died and exc_type is None:
            raise ServerDied(f"server died during the test (exit code {code}); log:\n{self.log}")
        self._log.close()
        self._log_path.unlink(missing_ok=True)
