"""A closed-loop HTTP load generator: N concurrent callers, each sending the next request as
soon as its previous answer arrives. asyncio + aiohttp (+ uvloop when installed).

Library use: ``run_load(url, body, headers, concurrency=16, duration_s=3)``; or from the
command line: ``python bench/loadgen.py URL --body-file req.json --concurrency 1,4,16,64``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp


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
    completed: int = 0  # all responses of the run, warm-up and drain included

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def _load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> LoadResult:
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    latencies: list[float] = []
    errors = 0
    completed = 0  # every response, warm-up and drain included
    first_error = ""
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        start = time.perf_counter()
        # The window opens once every caller has had an answer (steady state; with many
        # callers on a slow model the first answers take a while) and warmup_s has passed.
        window = {"from": float("inf"), "end": float("inf")}
        warmed = 0

        def open_window(now: float) -> None:
            window["from"] = max(now, start + warmup_s)
            window["end"] = window["from"] + duration_s

        async def caller() -> None:
            nonlocal errors, first_error, completed, warmed
            first = True
            while True:
                sent = time.perf_counter()
                if sent >= window["end"]:
                    return
                if first and sent - start > 120:  # never warmed up: measure anyway
                    open_window(sent)
                async with session.post(url, data=body, headers=headers) as response:
                    payload = await response.read()
                    status = response.status
                done = time.perf_counter()
                completed += 1
                if first:
                    first = False
                    warmed += 1
                    if warmed == concurrency:
                        open_window(done)
                # the rate counts what completes inside the window, so neither the warm-up
                # nor the tail that drains after it (long with many callers) dilutes it
                if window["from"] <= done <= window["end"]:
                    latencies.append(done - sent)
                    if status != 200:
                        errors += 1
                        first_error = first_error or f"{status}: {payload[:200]!r}"

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        seconds = duration_s
    ms = [x * 1000 for x in latencies]
    return LoadResult(
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=seconds,
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        first_error=first_error,
        completed=completed,
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
    """Drive ``url`` with ``concurrency`` closed-loop callers for ``duration_s`` seconds."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    return runner(_load(url, body, dict(headers or {}), concurrency, duration_s, warmup_s))


def main() -> None:
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
    print(f"{'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} errors")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        r = run_load(args.url, body, headers, concurrency=concurrency, duration_s=args.duration)
        print(
            f"{concurrency:>5} {r.throughput:>9.0f} {r.p50_ms:>8.2f} {r.p90_ms:>8.2f} "
            f"{r.p99_ms:>8.2f} {r.errors} {r.first_error}"
        )


if __name__ == "__main__":
    main()
