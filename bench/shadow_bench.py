"""Shadow fidelity overhead: p99 latency with shadowing on vs off, under closed-loop load.

One real server (``python -m serving serve``) holds the same model several times: version 1
an FP32 MLP, version 2 its dynamic-INT8 quantization with a ``report.json`` naming version 1
as its source. Each copy has a different ``shadow_sample_rate`` (0 = off). Rounds are
interleaved (every rate once per round, in rotating order) and medians are reported with
the p99 ratio against the rate-0 copy (target <= 1.05 at 1% sampling).

    .venv/bin/python bench/shadow_bench.py [--rounds 5] [--duration 4] [--concurrency 8]
        [--rates 0,0.01,0.1] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from loadgen import run_load  # noqa: E402

from bench.results import write_section  # noqa: E402
from tests.e2e.server import RemoteServer  # noqa: E402
from tests.models import mlp_model, write_model  # noqa: E402
from tests.serving.test_shadow import int8, shadow_config  # noqa: E402

FEATURES = 64


def model_name(rate: float) -> str:
    return "mlp_rate_" + f"{rate:g}".replace(".", "_")


def build_repository(root: Path, rates: list[float], width: int) -> None:
    original = mlp_model(width=width, depth=4, features=FEATURES)
    quantized = int8(original, root.parent)
    for rate in rates:
        folder = write_model(
            root,
            model_name(rate),
            original,
            model_config=shadow_config(shadow_sample_rate=f"{rate:g}"),
        )
        (folder / "2").mkdir()
        (folder / "2" / "model.onnx").write_bytes(quantized)
        report = {"source_version": 1, "fidelity_bound": {"min_cosine": 0.99}}
        (folder / "2" / "report.json").write_text(json.dumps(report))


def request_body(batch: int) -> bytes:
    x = np.random.default_rng(0).standard_normal((batch, FEATURES)).astype(np.float32)
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def shadow_summary(url: str, name: str) -> dict:
    stats = httpx.get(f"{url}/v2/models/{name}/versions/2/stats").json()["model_stats"][0]
    return stats.get("shadow") or {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="rows per request")
    parser.add_argument("--width", type=int, default=512, help="MLP hidden width")
    parser.add_argument("--rates", default="0,0.01,0.1")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    if 0.0 not in rates:
        rates.insert(0, 0.0)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {uptime}")
    workdir = Path(tempfile.mkdtemp(prefix="slimserve-shadow-bench-"))
    repo = workdir / "repo"
    build_repository(repo, rates, args.width)
    body = request_body(args.batch)
    p99: dict[float, list[float]] = {r: [] for r in rates}
    p50: dict[float, list[float]] = {r: [] for r in rates}
    throughput: dict[float, list[float]] = {r: [] for r in rates}
    errors = 0
    summaries: dict[float, dict] = {}
    with RemoteServer(repo, env={"SLIMSERVE_LOG_LEVEL": "warning"}) as server:
        for round_index in range(args.rounds):
            order = rates[round_index % len(rates) :] + rates[: round_index % len(rates)]
            for rate in order:
                url = f"{server.url}/v2/models/{model_name(rate)}/infer"
                result = run_load(
                    url, body, {"Content-Type": "application/json"},
                    concurrency=args.concurrency, duration_s=args.duration,
                )  # fmt: skip
                p99[rate].append(result.p99_ms)
                p50[rate].append(result.p50_ms)
                throughput[rate].append(result.throughput)
                errors += result.errors
                print(
                    f"round {round_index + 1} rate {rate:<5g} {result.throughput:7.0f}/s "
                    f"p50 {result.p50_ms:6.2f} p99 {result.p99_ms:6.2f} ms err {result.errors} "
                    f"{result.first_error}"
                )
        for rate in rates:
            summaries[rate] = shadow_summary(server.url, model_name(rate))
    shutil.rmtree(workdir, ignore_errors=True)
    table = render(args, uptime, rates, p50, p99, throughput, summaries, errors)
    print(table)
    if not args.no_write:
        write_section("shadow_bench", table)


def render(args, uptime, rates, p50, p99, throughput, summaries, errors) -> str:
    base = statistics.median(p99[0.0])
    lines = [
        "## Shadow fidelity: p99 with shadowing on vs off (`bench/shadow_bench.py`)",
        "",
        f"`.venv/bin/python bench/shadow_bench.py --rounds {args.rounds} --duration "
        f"{args.duration:g} --concurrency {args.concurrency} --batch {args.batch} --width "
        f"{args.width} --rates {args.rates}` (load: {uptime.split('load average:')[-1].strip()})",
        "",
        f"MLP {FEATURES}->{args.width}x3->10, served version = dynamic INT8, source = FP32; "
        f"closed-loop JSON requests of {args.batch} row(s), concurrency {args.concurrency}; "
        f"medians of {args.rounds} interleaved rounds "
        "(every rate once per round, rotating order; per-round ratios pair runs seconds apart).",
        "",
        "| sample rate | req/s | p50 ms | p99 ms | p99 ratio vs off (medians) "
        "| p99 ratio, median of per-round ratios | shadow samples | dropped | rolling cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        summary = summaries.get(rate, {})
        p99_rate = statistics.median(p99[rate])
        cosine = summary.get("rolling_cosine")
        paired = statistics.median(a / b for a, b in zip(p99[rate], p99[0.0], strict=True))
        lines.append(
            f"| {rate:g} | {statistics.median(throughput[rate]):.0f} | "
            f"{statistics.median(p50[rate]):.2f} | {p99_rate:.2f} | {p99_rate / base:.3f} | "
            f"{paired:.3f} | "
            f"{summary.get('samples', '-')} | {summary.get('dropped', '-')} | "
            f"{'-' if cosine is None else f'{cosine:.4f}'} |"
        )
    lines += ["", f"errors: {errors}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
