"""Server throughput against the same model run in process: ``server efficiency``.

Starts a real server (``python -m serving serve``) on a temporary repository holding the demo
CNN (``model_repository/digits_cnn``, overhead-bound) and a generated compute-heavy wide CNN,
each twice: dynamic batching on, and off. For every model x protocol (JSON, binary) x
concurrency it drives closed-loop load (``bench/loadgen.py``), reads the batch sizes the server
formed from the statistics extension, times the same ONNX model in process with onnxruntime at
exactly those batch sizes, and prints

    efficiency = server samples/s / in-process samples/s (at the server's batch mix)

Rounds are interleaved (every configuration once per round) and medians are reported.

    .venv/bin/python bench/server_bench.py [--rounds 3] [--duration 3] [--concurrency 1,4,16,64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import orjson
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from loadgen import run_load  # noqa: E402

from bench.results import write_section  # noqa: E402
from serving.model_config import read_config, write_config  # noqa: E402
from tests.e2e.server import RemoteServer  # noqa: E402

# onnxruntime intra-op threads per model, the same for the server and the in-process engine
# (0 = onnxruntime's default, one per core); set by --threads
THREADS: dict[str, int] = {}


@dataclass(frozen=True)
class BenchModel:
    name: str
    input_name: str
    sample_shape: tuple[int, ...]
    output_name: str
    model_file: Path


def wide_cnn(channels: int = 64, size: int = 24, seed: int = 0) -> bytes:
    """Compute-heavy CNN: 3x24x24 -> 3 convs (3x3, 64-128-128 wide) -> pool -> 10 logits."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    inits, nodes, previous, fan_in = [], [], "input", 3
    for i, out in enumerate((channels, channels * 2, channels * 2)):
        w = (rng.standard_normal((out, fan_in, 3, 3)) / np.sqrt(fan_in * 9)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(
            np.zeros(out, np.float32), f"b{i}")]  # fmt: skip
        nodes += [
            helper.make_node("Conv", [previous, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        previous, fan_in = f"r{i}", out
    fc = (rng.standard_normal((fan_in, 10)) / np.sqrt(fan_in)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc")]
    inits += [numpy_helper.from_array(np.zeros(10, np.float32), "fb")]
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fb"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "wide_cnn", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_repository(root: Path) -> list[BenchModel]:
    """``<model>`` (batching on) and ``<model>_nobatch`` for the demo CNN and the wide CNN."""
    models = []
    demo = ROOT / "model_repository" / "digits_cnn"
    wide_file = root.parent / "wide_cnn.onnx"
    wide_file.write_bytes(wide_cnn())
    sources = []
    if (demo / "1" / "model.onnx").exists():
        sources.append(("digits_cnn", demo / "1" / "model.onnx", read_config(demo), (1, 8, 8)))
    else:
        print("model_repository/digits_cnn is missing: only the wide CNN is measured")
    from tritonclient.grpc import model_config_pb2 as mc

    config = mc.ModelConfig()
    config.platform = "onnxruntime_onnx"
    config.max_batch_size = 32
    config.dynamic_batching.max_queue_delay_microseconds = 2000
    sources.append(("wide_cnn", wide_file, config, (3, 24, 24)))
    for name, model_file, base, sample_shape in sources:
        for suffix, batching in (("", True), ("_nobatch", False)):
            cfg = mc.ModelConfig()
            cfg.CopyFrom(base)
            cfg.name = name + suffix
            del cfg.model_warmup[:]
            if THREADS.get(name):
                cfg.parameters["intra_op_thread_count"].string_value = str(THREADS[name])
            if not batching:
                cfg.ClearField("dynamic_batching")
            folder = root / cfg.name
            (folder / "1").mkdir(parents=True)
            shutil.copyfile(model_file, folder / "1" / "model.onnx")
            write_config(folder, cfg)
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        models.append(
            BenchModel(
                name,
                session.get_inputs()[0].name,
                sample_shape,
                session.get_outputs()[0].name,
                model_file,
            )
        )
    return models


def request_body(model: BenchModel, protocol: str) -> tuple[bytes, dict[str, str]]:
    """One single-sample request, JSON or binary, plus its headers."""
    rng = np.random.default_rng(1)
    sample = rng.random((1, *model.sample_shape), dtype=np.float32)
    headers = {"Accept-Encoding": "identity"}
    tensor = {"name": model.input_name, "datatype": "FP32", "shape": list(sample.shape)}
    if protocol == "json":
        tensor["data"] = sample.reshape(-1).tolist()
        body = orjson.dumps({"inputs": [tensor], "outputs": [{"name": model.output_name}]})
        headers["Content-Type"] = "application/json"
        return body, headers
    raw = sample.tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = orjson.dumps(
        {
            "inputs": [tensor],
            "outputs": [{"name": model.output_name, "parameters": {"binary_data": True}}],
        }
    )
    headers["Inference-Header-Content-Length"] = str(len(header))
    headers["Content-Type"] = "application/octet-stream"
    return header + raw, headers


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_counts(url: str, name: str) -> dict[int, int]:
    stats = httpx.get(f"{url}/v2/models/{name}/versions/1/stats", timeout=30).json()
    entry = stats["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in entry["batch_stats"]}


def engine_seconds(model: BenchModel, batch: int, repeats: int = 30) -> float:
    """Median seconds of one in-process ``session.run`` at ``batch`` rows."""
    session = _sessions.get(model.name)
    if session is None:
        options = ort.SessionOptions()
        if THREADS.get(model.name):
            options.intra_op_num_threads = THREADS[model.name]
        session = _sessions[model.name] = ort.InferenceSession(
            str(model.model_file), sess_options=options, providers=["CPUExecutionProvider"]
        )
    x = np.random.default_rng(2).random((batch, *model.sample_shape), dtype=np.float32)
    feed = {model.input_name: x}
    session.run(None, feed)
    times = []
    deadline = time.perf_counter() + 2.0
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(times) >= 5:
            break
    return statistics.median(times)


_sessions: dict[str, ort.InferenceSession] = {}


def engine_throughput(model: BenchModel, counts: dict[int, int]) -> float:
    """In-process samples/s running the batches the server formed (same sizes, same mix)."""
    rows = sum(size * n for size, n in counts.items())
    seconds = sum(engine_seconds(model, size) * n for size, n in counts.items())
    return rows / seconds if seconds else 0.0


@dataclass
class Cell:
    throughput: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    efficiency: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    mean_batch: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    errors: int = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--models", default="digits_cnn,wide_cnn")
    parser.add_argument("--protocols", default="json,binary")
    parser.add_argument(
        "--threads",
        default="digits_cnn=1,wide_cnn=0",
        help="onnxruntime intra-op threads per model (server and in-process alike; 0 = default)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    for item in filter(None, args.threads.split(",")):
        key, _, value = item.partition("=")
        THREADS[key] = int(value)
    levels = [int(c) for c in args.concurrency.split(",")]
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {uptime}")
    workdir = Path(tempfile.mkdtemp(prefix="slimserve-bench-"))
    repo = workdir / "repo"
    repo.mkdir()
    models = [m for m in build_repository(repo) if m.name in args.models.split(",")]
    cells: dict[tuple[str, str, str, int], Cell] = {}
    engine_b1: dict[str, list[float]] = {m.name: [] for m in models}
    with RemoteServer(repo, env={"SLIMSERVE_LOG_LEVEL": "warning"}) as server:
        for round_index in range(args.rounds):
            print(f"-- round {round_index + 1}/{args.rounds}")
            for model in models:
                engine_b1[model.name].append(1.0 / engine_seconds(model, 1))
                for protocol in args.protocols.split(","):
                    body, headers = request_body(model, protocol)
                    for batching in ("on", "off"):
                        name = model.name + ("" if batching == "on" else "_nobatch")
                        url = f"{server.url}/v2/models/{name}/infer"
                        for concurrency in levels:
                            before = batch_counts(server.url, name)
                            cpu_before = cpu_seconds(server.process.pid)
                            result = run_load(
                                url, body, headers, concurrency=concurrency,
                                duration_s=args.duration,
                            )  # fmt: skip
                            cpu = cpu_seconds(server.process.pid) - cpu_before
                            after = batch_counts(server.url, name)
                            counts = {
                                s: after.get(s, 0) - before.get(s, 0)
                                for s in after
                                if after.get(s, 0) - before.get(s, 0) > 0
                            }
                            engine = engine_throughput(model, counts)
                            cell = cells.setdefault(
                                (model.name, protocol, batching, concurrency), Cell()
                            )
                            cell.throughput.append(result.throughput)
                            cell.engine.append(engine)
                            cell.efficiency.append(result.throughput / engine if engine else 0)
                            cell.p50.append(result.p50_ms)
                            cell.p99.append(result.p99_ms)
                            executions = sum(counts.values())
                            rows = sum(s * n for s, n in counts.items())
                            cell.mean_batch.append(rows / executions if executions else 0)
                            cell.errors += result.errors
                            # the whole run's CPU over every request it served
                            served = result.completed
                            cell.cpu_us.append(cpu / served * 1e6 if served else 0.0)
                            print(
                                f"{model.name:>10} {protocol:>6} batching={batching:<3} "
                                f"c={concurrency:<3} {result.throughput:8.0f}/s "
                                f"engine {engine:8.0f}/s eff {cell.efficiency[-1]:.2f} "
                                f"p50 {result.p50_ms:6.2f} p99 {result.p99_ms:6.2f} ms "
                                f"batch {cell.mean_batch[-1]:.1f} "
                                f"cpu {cell.cpu_us[-1]:.0f}us/req err {result.errors} "
                                f"{result.first_error}"
                            )
    shutil.rmtree(workdir, ignore_errors=True)
    table = render(cells, engine_b1, args, uptime)
    print(table)
    if not args.no_write:
        write_section("server_bench", table)


def render(
    cells: dict[tuple[str, str, str, int], Cell],
    engine_b1: dict[str, list[float]],
    args: argparse.Namespace,
    uptime: str,
) -> str:
    med = statistics.median
    lines = [
        "## Server throughput vs. in-process engine (bench/server_bench.py)",
        "",
        f"Command: `.venv/bin/python bench/server_bench.py --rounds {args.rounds} "
        f"--duration {args.duration} --concurrency {args.concurrency} "
        f"--threads {args.threads}`  ",
        f"Machine: {os.cpu_count()} CPUs; `uptime` before the run: `{uptime}`  ",
        f"Medians of {args.rounds} interleaved rounds of {args.duration}s per cell; one sample "
        "per request; the load generator runs on the same cores as the server.",
        "`engine/s` = onnxruntime in process running the batch sizes the server formed in that "
        "run; `eff` = server samples/s / engine samples/s; `server CPU us/req` = CPU time the "
        "server process used per request (all threads, engine included), which contention from "
        "other processes does not inflate the way it inflates wall-clock figures.",
        "",
    ]
    for model, values in engine_b1.items():
        lines.append(f"- {model}: in-process engine at batch 1: {med(values):.0f} samples/s")
    lines += [
        "",
        "| model | protocol | batching | conc | server samples/s | engine samples/s | eff "
        "| mean batch | p50 ms | p99 ms | server CPU us/req | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, protocol, batching, concurrency), cell in cells.items():
        lines.append(
            f"| {model} | {protocol} | {batching} | {concurrency} | {med(cell.throughput):.0f} "
            f"| {med(cell.engine):.0f} | {med(cell.efficiency):.2f} | {med(cell.mean_batch):.1f} "
            f"| {med(cell.p50):.2f} | {med(cell.p99):.2f} | {med(cell.cpu_us):.0f} "
            f"| {cell.errors} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
