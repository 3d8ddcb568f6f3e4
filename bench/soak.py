"""A bounded soak of a real server on the demo model (``digits_cnn``): N requests at
concurrency C, JSON and binary alternating, a few bad requests mixed in.

Reports throughput, p50/p99 of the good requests, responses by status, and the server's RSS
at start, after warm-up and at the end. Passes (exit 0) only with zero unexpected statuses
(every good request 200, every bad one its own 4xx; no 5xx at all) and RSS growth after
warm-up below 10%.

    python bench/soak.py                          # 100k requests at concurrency 64
    python bench/soak.py --requests 20000 --write-results
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.results import write_section  # noqa: E402
from tests.e2e.server import RemoteServer  # noqa: E402

MODEL = "digits_cnn"


@dataclass(frozen=True)
class Request:
    """One request of the mix with the status it must get."""

    kind: str
    path: str
    body: bytes
    headers: dict[str, str]
    expect: int


def good_requests() -> list[Request]:
    """A JSON and a binary single-sample request for the demo CNN."""
    sample = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    path = f"/v2/models/{MODEL}/infer"
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8]}
    as_json = orjson.dumps({"inputs": [{**tensor, "data": sample.ravel().tolist()}]})
    raw = sample.tobytes()
    header = orjson.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    )
    binary_headers = {"Inference-Header-Content-Length": str(len(header))}
    return [
        Request("json", path, as_json, {"Content-Type": "application/json"}, 200),
        Request("binary", path, header + raw, binary_headers, 200),
    ]


def bad_requests() -> list[Request]:
    """Client mistakes, each with the 4xx it must get."""
    path = f"/v2/models/{MODEL}/infer"
    wrong_shape = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 7], "data": [0] * 56}
    return [
        Request("bad:malformed", path, b'{"inputs": [', {}, 400),
        Request("bad:shape", path, orjson.dumps({"inputs": [wrong_shape]}), {}, 400),
        Request("bad:unknown-model", "/v2/models/nope/infer", b"{}", {}, 404),
        Request(
            "bad:header-length",
            path,
            b"{}",
            {"Inference-Header-Content-Length": "999"},
            400,
        ),
    ]


@dataclass
class Tally:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(
    url: str, total: int, concurrency: int, bad_every: int, on_progress
) -> tuple[Tally, float]:
    """Send ``total`` requests from ``concurrency`` callers; every ``bad_every``-th is bad."""
    good, bad = good_requests(), bad_requests()
    tally = Tally()
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def caller() -> None:
            nonlocal next_index
            while next_index < total:
                index = next_index
                next_index += 1
                if bad_every and index % bad_every == bad_every - 1:
                    request = bad[(index // bad_every) % len(bad)]
                else:
                    request = good[index % len(good)]
                sent = time.perf_counter()
                try:
                    async with session.post(
                        url + request.path, data=request.body, headers=request.headers
                    ) as response:
                        payload = await response.read()
                        status = response.status
                except aiohttp.ClientError as exc:
                    status, payload = 0, str(exc).encode()
                done = time.perf_counter()
                tally.statuses[(request.kind, status)] += 1
                if status != request.expect:
                    tally.unexpected.append(f"{request.kind} -> {status}: {payload[:200]!r}")
                elif request.expect == 200:
                    tally.latencies.append(done - sent)
                on_progress(index)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return tally, seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5_000, help="requests before RSS baseline")
    parser.add_argument("--bad-every", type=int, default=500, help="1 bad request in N")
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="slimserve-soak-"))
    repo = work / "repository"
    shutil.copytree(ROOT / "model_repository" / MODEL, repo / MODEL)
    env = {"SLIMSERVE_LOG_LEVEL": "warning", "SLIMSERVE_JOBS_DIR": str(work / "jobs")}
    try:
        with RemoteServer(repo, env=env) as server:
            assert server.process is not None
            pid = server.process.pid
            rss = {"start": rss_mib(pid)}
            samples: list[tuple[int, float]] = []
            step = max(args.requests // 10, 1)

            def on_progress(index: int) -> None:
                if index == args.warmup:
                    rss["after warm-up"] = rss_mib(pid)
                if index % step == 0:
                    samples.append((index, rss_mib(pid)))

            tally, seconds = asyncio.run(
                soak(server.url, args.requests, args.concurrency, args.bad_every, on_progress)
            )
            rss["end"] = rss_mib(pid)
            alive = server.process.poll() is None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = render(args, tally, seconds, rss, samples, alive)
    print(report)
    if args.write_results:
        write_section("soak", "## Soak (bench/soak.py)\n\n" + report)
    server_errors = sum(n for (_, status), n in tally.statuses.items() if status >= 500)
    growth = rss["end"] / rss.get("after warm-up", rss["start"]) - 1
    ok = alive and not tally.unexpected and server_errors == 0 and growth < 0.10
    sys.exit(0 if ok else 1)


def render(args, tally: Tally, seconds: float, rss, samples, alive: bool) -> str:
    good = len(tally.latencies)
    server_errors = sum(n for (_, status), n in tally.statuses.items() if status >= 500)
    baseline = rss.get("after warm-up", rss["start"])
    growth = rss["end"] / baseline - 1
    verdict = (
        "PASS"
        if alive and not tally.unexpected and server_errors == 0 and growth < 0.10
        else "FAIL"
    )
    lines = [
        f"Command: `python bench/soak.py --requests {args.requests} "
        f"--concurrency {args.concurrency} --bad-every {args.bad_every} "
        f"--warmup {args.warmup}` (model {MODEL}, JSON and binary alternating, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests | {args.requests} in {seconds:.1f} s |",
        f"| throughput (all responses) | {args.requests / seconds:.0f} req/s |",
        f"| good requests | {good} (p50 {percentile(tally.latencies, 50) * 1e3:.1f} ms, "
        f"p99 {percentile(tally.latencies, 99) * 1e3:.1f} ms) |",
        f"| unexpected statuses | {len(tally.unexpected)} |",
        f"| 5xx | {server_errors} |",
        f"| RSS start / after warm-up / end | {rss['start']:.1f} / {baseline:.1f} / "
        f"{rss['end']:.1f} MiB ({growth * 100:+.1f}% after warm-up) |",
        f"| server alive at the end | {alive} |",
        f"| verdict (0 unexpected, 0 5xx, RSS growth < 10%) | **{verdict}** |",
        "",
        "| request kind | status | count |",
        "|---|---|---|",
    ]
    for (kind, status), count in sorted(tally.statuses.items()):
        lines.append(f"| {kind} | {status} | {count} |")
    lines += ["", "RSS during the run (request index: MiB): "
              + ", ".join(f"{i}: {m:.1f}" for i, m in samples)]  # fmt: skip
    if tally.unexpected:
        lines += ["", "First unexpected responses:", *(f"- {u}" for u in tally.unexpected[:5])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
