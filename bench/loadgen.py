"""A cheap closed-loop HTTP/1.1 load generator: N keep-alive connections, each sending the next
request as soon as its previous answer arrives (like perf_analyzer's concurrency mode).

Built to cost the server's machine as little CPU as possible: every request's bytes (request
line, headers, body) are encoded once, each connection is an ``asyncio.Protocol`` (no stream
objects, no per-request coroutine), responses are parsed only as far as the status code and
``Content-Length``, and uvloop runs the loop when installed. The generator's own CPU time is
measured (``client_cpu_us`` per response) so a report can show where the machine's CPU went.

Library use: ``run_load(url, body, headers, concurrency=16, duration_s=3)``;
``run_load_process(...)`` runs it in a child process (own CPU accounting, optional core
pinning). Command line: ``python bench/loadgen.py URL --body-file req.bin --concurrency 1,16``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    """What one load run measured (latencies in milliseconds)."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    first_error: str = ""
    mean_ms: float = 0.0
    completed: int = 0  # all responses of the run, warm-up and drain included
    client_cpu_s: float = 0.0  # the generator's own CPU time (user + system) for the run
    elapsed_s: float = 0.0  # the whole run: first connection to last answer (drain included)

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    @property
    def little_throughput(self) -> float:
        """Requests per second by Little's law: callers / mean latency. In a closed loop
        with no think time every caller always has one request outstanding, so this is the
        rate without the +-1-batch quantisation of counting completions in a fixed window
        (large when a slow model answers 16 requests at once a few times per window)."""
        if not self.mean_ms or not self.requests:
            return 0.0
        ok = (self.requests - self.errors) / self.requests
        return self.concurrency / (self.mean_ms / 1000) * ok

    @property
    def client_cpu_us(self) -> float:
        """The generator's CPU microseconds per response."""
        return self.client_cpu_s / self.completed * 1e6 if self.completed else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def encode_request(url: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """The complete HTTP/1.1 POST (request line, headers, body) as bytes, built once."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}"]
    given = {key.lower() for key in (headers or {})}
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    if "content-length" not in given:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_head(head: bytes) -> tuple[int, int]:
    """Status code and ``Content-Length`` of a response head (without the blank line)."""
    status = int(head[9:12])
    lowered = head.lower()
    at = lowered.find(b"\r\ncontent-length:")
    if at < 0:
        raise ValueError(f"response without Content-Length: {head[:200]!r}")
    end = lowered.find(b"\r\n", at + 2)
    return status, int(lowered[at + 17 : end if end >= 0 else len(lowered)])


class _Window:
    """The measurement window: opens once every connection had an answer (steady state) and
    ``warmup_s`` has passed, and lasts ``duration_s``; only answers inside it are counted."""

    def __init__(self, concurrency: int, duration_s: float, warmup_s: float) -> None:
        self.start = time.perf_counter()
        self.concurrency = concurrency
        self.duration_s = duration_s
        self.warmup_s = warmup_s
        self.begin = float("inf")
        self.end = float("inf")
        self.warmed = 0
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error = ""
        self.completed = 0

    def open(self, now: float) -> None:
        self.begin = max(now, self.start + self.warmup_s)
        self.end = self.begin + self.duration_s


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending ``request`` back to back until the window closes."""

    def __init__(self, request: bytes, window: _Window, done: asyncio.Future[None]) -> None:
        self.request = request
        self.window = window
        self.done = done
        self.buffer = bytearray()
        self.need = -1  # bytes of the whole response once its head is parsed
        self.status = 0
        self.sent = 0.0
        self.first = True
        self.closing = False  # set when this side closes at the window's end
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter()
        if self.sent >= self.window.end:
            self.closing = True
            self.transport.close()
            return
        if self.first and self.sent - self.window.start > 120:  # never warmed up: measure
            self.window.open(self.sent)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            if self.need < 0:
                head_end = buffer.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                self.status, length = parse_head(bytes(buffer[:head_end]))
                self.need = head_end + 4 + length
            if len(buffer) < self.need:
                return
            tail = b"" if self.status == 200 else bytes(buffer[max(0, self.need - 200) : self.need])
            del buffer[: self.need]
            self.need = -1
            self._answered(tail)
            if self.transport is None or self.transport.is_closing():
                return

    def _answered(self, tail: bytes) -> None:
        window = self.window
        now = time.perf_counter()
        window.completed += 1
        if self.first:
            self.first = False
            window.warmed += 1
            if window.warmed == window.concurrency:
                window.open(now)
        # the rate counts what completes inside the window, so neither the warm-up nor the
        # tail that drains after it (long with many callers) dilutes it
        if window.begin <= now <= window.end:
            window.latencies.append(now - self.sent)
            if self.status != 200:
                window.errors += 1
                window.first_error = window.first_error or f"{self.status}: {tail!r}"
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:  # the server closed it (or it broke) mid-run
            self.window.errors += 1
            self.window.first_error = self.window.first_error or f"connection lost: {exc}"
        if not self.done.done():
            self.done.set_result(None)


async def _load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> LoadResult:
    parts = urlsplit(url)
    request = encode_request(url, body, headers)
    loop = asyncio.get_running_loop()
    window = _Window(concurrency, duration_s, warmup_s)
    cpu_before = time.process_time()
    started = time.perf_counter()
    finished = []
    for _ in range(concurrency):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(
            lambda d=done: _Connection(request, window, d),
            parts.hostname or "127.0.0.1",
            parts.port or 80,
        )
        finished.append(done)
    await asyncio.gather(*finished)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    ms = [x * 1000 for x in window.latencies]
    return LoadResult(
        concurrency=concurrency,
        requests=len(ms),
        errors=window.errors,
        seconds=duration_s,
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        first_error=window.first_error,
        mean_ms=sum(ms) / len(ms) if ms else 0.0,
        completed=window.completed,
        client_cpu_s=cpu,
        elapsed_s=elapsed,
    )


def run_load(
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    concurrency: int = 16,
    duration_s: float = 3.0,
    warmup_s: float = 0.5,
) -> LoadResult:
    """Drive ``url`` with ``concurrency`` closed-loop connections for ``duration_s`` seconds."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    return runner(_load(url, body, dict(headers or {}), concurrency, duration_s, warmup_s))


def run_load_process(
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    concurrency: int = 16,
    duration_s: float = 3.0,
    warmup_s: float = 0.5,
    pin_cpu: int | None = None,
) -> LoadResult:
    """``run_load`` in a child process (optionally pinned to core ``pin_cpu``), so its CPU
    time is its own and pinning does not touch the caller's threads."""
    with tempfile.NamedTemporaryFile(suffix=".body") as file:
        file.write(body)
        file.flush()
        spec = {
            "url": url,
            "body_file": file.name,
            "headers": dict(headers or {}),
            "concurrency": concurrency,
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "pin_cpu": pin_cpu,
        }
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr[-2000:]}")
    return LoadResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def _worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("pin_cpu") is not None:
        os.sched_setaffinity(0, {int(spec["pin_cpu"])})
    result = run_load(
        spec["url"],
        Path(spec["body_file"]).read_bytes(),
        spec["headers"],
        concurrency=spec["concurrency"],
        duration_s=spec["duration_s"],
        warmup_s=spec["warmup_s"],
    )
    print(json.dumps(asdict(result)))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000/v2/models/digits_cnn/infer")
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--header-length", type=int, help="Inference-Header-Content-Length")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    body = args.body_file.read_bytes()
    headers = {"Accept-Encoding": "identity"}
    if args.header_length is not None:
        headers["Inference-Header-Content-Length"] = str(args.header_length)
        headers["Content-Type"] = "application/octet-stream"
    print(f"{'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} cpu us/req errors")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        r = run_load(args.url, body, headers, concurrency=concurrency, duration_s=args.duration)
        print(
            f"{concurrency:>5} {r.throughput:>9.0f} {r.p50_ms:>8.2f} {r.p90_ms:>8.2f} "
            f"{r.p99_ms:>8.2f} {r.client_cpu_us:>10.0f} {r.errors} {r.first_error}"
        )


if __name__ == "__main__":
    main()
