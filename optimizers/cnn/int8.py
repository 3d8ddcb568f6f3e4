"""Calibrated static INT8 for CNNs: QDQ, per-channel weights, sensitive-layer exclusion.

Steps: ONNX Runtime's pre-processing (shape inference, Conv+BatchNorm folding and the other
basic graph optimizations), then ``quantize_static`` in QDQ format with per-channel weights for
each calibration method (MinMax / Percentile / Entropy) on the user's calibration images;
Relu/Clip after a Conv are absorbed into its output quantization (Conv+ReLU fusion). The best
method is kept; when the accuracy bound does not hold, the most sensitive layers — measured by
quantizing one layer at a time — are left in float, one by one, until it holds.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from optimizers.cnn import graph, timing

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy")
QUANTIZABLE = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Int8Options:
    """How to quantize and what counts as good enough."""

    methods: tuple[str, ...] = METHODS
    per_channel: bool = True
    activation_type: str = "uint8"  # "uint8" (U8S8, x86 VNNI's fast path) or "int8" (S8S8)
    max_accuracy_drop: float = 0.01  # fraction, when labels are given
    min_agreement: float = 0.99  # top-1 agreement with FP32, when they are not
    max_excluded: int = 6
    max_mse: float | None = None  # optional bound on the output MSE relative to FP32's
    min_cosine: float | None = None  # optional bound on the mean output cosine to FP32
    percentile: float = 99.99
    sensitivity_samples: int = 64  # held-out samples used to rank layers (speed)
    entropy_bins: int = 512  # histogram bins for Entropy calibration (KL search candidates)
    op_types: tuple[str, ...] | None = None  # None: every op ORT can quantize (Add, pools ...)
    preprocess: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown or 'none given'}; use {list(METHODS)}")
        if self.activation_type not in ("int8", "uint8"):
            raise ValueError(f"activation_type must be int8 or uint8, not {self.activation_type!r}")
        if not 0 <= self.max_accuracy_drop <= 1:
            raise ValueError("max_accuracy_drop is a fraction in [0, 1]")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError("min_agreement is a fraction in [0, 1]")


@dataclass
class Evaluation:
    """Held-out data and how a quantized model is scored against the FP32 one."""

    inputs: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None
    reference: list[np.ndarray] = field(default_factory=list)  # FP32 first outputs

    def outputs(self, model: Path | onnx.ModelProto) -> np.ndarray:
        sess = timing.session(model if isinstance(model, onnx.ModelProto) else str(model))
        name = sess.get_outputs()[0].name
        return np.concatenate([sess.run([name], feed)[0] for feed in self.inputs])

    def subset(self, count: int) -> Evaluation:
        """The first ``count`` samples (whole batches), references included."""
        inputs, reference, seen = [], [], 0
        for i, feed in enumerate(self.inputs):
            if seen >= count:
                break
            inputs.append(feed)
            if self.reference:
                reference.append(self.reference[i])
            seen += len(next(iter(feed.values())))
        labels = None if self.labels is None else self.labels[:seen]
        return Evaluation(inputs, labels, reference)

    def score(self, outputs: np.ndarray) -> dict[str, float]:
        reference = np.concatenate(self.reference)
        pred, ref_pred = outputs.argmax(axis=1), reference.argmax(axis=1)
        flat, ref_flat = outputs.reshape(len(outputs), -1), reference.reshape(len(outputs), -1)
        cosine = (flat * ref_flat).sum(1) / (
            np.linalg.norm(flat, axis=1) * np.linalg.norm(ref_flat, axis=1) + 1e-12
        )
        result = {
            "agreement": float((pred == ref_pred).mean()),
            "cosine": float(cosine.mean()),
            "mse": float(((flat - ref_flat) ** 2).mean() / ((ref_flat**2).mean() + 1e-12)),
        }
        if self.labels is not None:
            result["accuracy"] = float((pred == self.labels).mean())
            result["fp32_accuracy"] = float((ref_pred == self.labels).mean())
        return result


def passes(score: dict[str, float], options: Int8Options) -> bool:
    """True when ``score`` is inside the bound (accuracy drop with labels, else agreement)."""
    if options.max_mse is not None and score["mse"] > options.max_mse:
        return False
    if options.min_cosine is not None and score["cosine"] < options.min_cosine:
        return False
    if "accuracy" in score:
        return score["fp32_accuracy"] - score["accuracy"] <= options.max_accuracy_drop + 1e-9
    return score["agreement"] >= options.min_agreement


def _rank(score: dict[str, float]) -> tuple[float, float]:
    primary = score.get("accuracy", score["agreement"])
    return (primary, -score["mse"])


class _Reader:
    """``CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._iter = iter(self._feeds)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


def preprocess(source: Path, dest: Path) -> tuple[Path, str]:
    """ORT quantization pre-processing (BN folding, shape inference); falls back to a copy."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(dest), skip_symbolic_shape=True)
        return dest, "quant_pre_process (ORT basic optimizations: Conv+BN folding, shapes)"
    except Exception as exc:  # some graphs break ORT's shape helpers; quantize as given
        log.warning("quant_pre_process failed (%s); quantizing the model as given", exc)
        shutil.copy(source, dest)
        return dest, f"skipped: {type(exc).__name__}: {exc}"


def quantize(
    source: Path,
    dest: Path,
    calibration: Sequence[dict[str, np.ndarray]],
    method: str,
    options: Int8Options,
    *,
    exclude: Sequence[str] = (),
    only: Sequence[str] = (),
    cache_dir: Path | None = None,
) -> Path:
    """One ``quantize_static`` run (QDQ); calibration ranges cached per method."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calib = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    extra = {"CalibPercentile": options.percentile} if method == "percentile" else {}
    cache_dir = cache_dir or dest.parent
    cache = cache_dir / f"calibration_{method}.json"
    if method == "entropy" and not cache.exists():
        entropy_ranges(source, calibration, cache, options.entropy_bins)
    quantize_static(
        str(source),
        str(dest),
        _Reader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=options.per_channel,
        activation_type=QuantType.QInt8 if options.activation_type == "int8" else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=calib,
        nodes_to_exclude=list(exclude),
        nodes_to_quantize=list(only) or None,
        op_types_to_quantize=list(options.op_types) if options.op_types else None,
        calibration_cache_path=str(cache),
        extra_options=extra,
    )
    return dest


def entropy_ranges(
    source: Path, calibration: Sequence[dict[str, np.ndarray]], cache: Path, bins: int
) -> None:
    """Entropy (KL) calibration with a usable histogram, saved as ``quantize_static``'s cache.

    ``quantize_static`` builds its Entropy calibrator with 128 histogram bins and 128 quantized
    bins, which leaves the KL search a single candidate (the full min/max range), so Entropy
    silently equals MinMax. ORT's own calibrator with ``num_bins > num_quantized_bins`` does
    the real search; its ranges are written where ``quantize_static`` reads its cache.
    """
    import tempfile

    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        create_calibrator,
        save_tensors_data,
    )

    with tempfile.TemporaryDirectory(prefix="cnn_entropy_") as tmp:
        calibrator = create_calibrator(
            Path(source),
            [],
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": bins, "num_quantized_bins": 128},
        )
        calibrator.collect_data(_Reader(calibration))
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache)


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the compute nodes (Conv/Gemm/MatMul) in graph order."""
    return [n.name for n in model.graph.node if n.op_type in QUANTIZABLE and n.name]


def sensitivity(
    source: Path,
    workdir: Path,
    calibration: Sequence[dict[str, np.ndarray]],
    evaluation: Evaluation,
    method: str,
    options: Int8Options,
    check: Callable[[], None] | None = None,
) -> list[dict]:
    """Quantize one layer at a time; rows sorted from most to least damaging."""
    rows = []
    for name in quantizable_nodes(graph.load(source)):
        if check is not None:
            check()
        path = quantize(
            source,
            workdir / "one_layer.onnx",
            calibration,
            method,
            options,
            only=[name],
            cache_dir=workdir,
        )
        score = evaluation.score(evaluation.outputs(path))
        rows.append({"node": name, "mse": score["mse"], "agreement": score["agreement"]})
    rows.sort(key=lambda r: r["mse"], reverse=True)
    return rows


def quantize_cnn(
    source: Path,
    workdir: Path,
    calibration: Sequence[dict[str, np.ndarray]],
    evaluation: Evaluation,
    options: Int8Options = Int8Options(),
    *,
    check: Callable[[], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, dict]:
    """Quantize ``source``; the INT8 model (best method, exclusions applied) and a report."""
    workdir.mkdir(parents=True, exist_ok=True)
    pre, pre_note = (
        preprocess(source, workdir / "preprocessed.onnx") if options.preprocess else (source, "off")
    )
    if not evaluation.reference:
        sess = timing.session(str(source))
        name = sess.get_outputs()[0].name
        evaluation.reference = [sess.run([name], feed)[0] for feed in evaluation.inputs]
    fp32 = evaluation.score(np.concatenate(evaluation.reference))
    report: dict = {
        "preprocess": pre_note,
        "per_channel": options.per_channel,
        "format": "QDQ",
        "activation_type": options.activation_type,
        "calibration_samples": int(sum(len(next(iter(f.values()))) for f in calibration)),
        "evaluation_samples": int(sum(len(next(iter(f.values()))) for f in evaluation.inputs)),
        "metric": "accuracy" if evaluation.labels is not None else "top1_agreement",
        "fp32": fp32,
        "methods": {},
    }
    best: tuple[tuple[float, float], str, Path] | None = None
    for method in options.methods:
        if check is not None:
            check()
        if progress is not None:
            progress(f"calibrating ({method})")
        path = workdir / f"int8_{method}.onnx"
        try:
            quantize(pre, path, calibration, method, options, cache_dir=workdir)
        except Exception as exc:  # e.g. histogram calibration with too many bins
            report["methods"][method] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        score = evaluation.score(evaluation.outputs(path))
        report["methods"][method] = score
        if best is None or _rank(score) > best[0]:
            best = (_rank(score), method, path)
    if best is None:
        raise RuntimeError(f"every calibration method failed: {report['methods']}")
    _, method, path = best
    report["method"] = method
    score = report["methods"][method]
    excluded: list[str] = []
    if not passes(score, options) and options.max_excluded > 0:
        if progress is not None:
            progress("measuring per-layer sensitivity")
        probe = evaluation.subset(options.sensitivity_samples)
        ranking = sensitivity(pre, workdir, calibration, probe, method, options, check)
        report["sensitivity"] = ranking
        # Leaving a layer in float is not monotone (it moves Q/DQ pairs around its
        # neighbours), so every step is scored and the best set is kept if none passes.
        best_path = workdir / "int8_best_excluded.onnx"
        shutil.copy(path, best_path)
        best = (list(excluded), score)
        steps = [{"excluded": 0, **score}]
        candidate = list(excluded)
        for row in ranking[: options.max_excluded]:
            if check is not None:
                check()
            candidate.append(row["node"])
            step_path = quantize(
                pre,
                workdir / "int8_excluded.onnx",
                calibration,
                method,
                options,
                exclude=candidate,
                cache_dir=workdir,
            )
            step_score = evaluation.score(evaluation.outputs(step_path))
            steps.append({"excluded": len(candidate), **step_score})
            if passes(step_score, options) or _rank(step_score) > _rank(best[1]):
                shutil.copy(step_path, best_path)
                best = (list(candidate), step_score)
            if passes(step_score, options):
                break
        report["exclusion_steps"] = steps
        excluded, score, path = best[0], best[1], best_path
    report["excluded"] = excluded
    report["int8"] = score
    report["within_bound"] = passes(score, options)
    final = workdir / "model_int8.onnx"
    shutil.copy(path, final)
    return final, report
