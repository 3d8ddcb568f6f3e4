"""INT8 quantization with ``onnxruntime.quantization``: dynamic (per-channel weights) and
static QDQ with calibration (MinMax / Percentile / Entropy) and measured sensitive-node
exclusion."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from optimizers.fidelity import compare, run_batches
from optimizers.onnxutil import check_loads, make_session, op_counts
from optimizers.passes.base import Artifact, Pass, PassContext, PassNotApplicable, PassResult
from optimizers.registry import register_pass

QUANT_OPS = (
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QAttention",
    "QuantizeLinear",
    "DequantizeLinear",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
)


def _quiet() -> None:
    logging.getLogger().setLevel(logging.ERROR)


def _quant_stats(before: Path, after: Path) -> dict[str, Any]:
    counts = op_counts(after)
    return {
        "quantized_ops": {op: counts[op] for op in QUANT_OPS if counts.get(op)},
        "size_before": before.stat().st_size,
        "size_after": after.stat().st_size,
    }


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


@register_pass
class QuantizeDynamic(Pass):
    """Dynamic INT8: weights quantized offline (per channel by default), activations at run
    time. Per-tensor weights visibly hurt MiniLM (cosine ≈ 0.94 vs ≈ 0.99 per channel)."""

    name = "quantize_dynamic"
    helps = frozenset({"cpu"})

    @dataclass(frozen=True)
    class Config:
        per_channel: bool = True
        weight_type: str = "int8"
        reduce_range: bool = False
        op_types: tuple[str, ...] | None = None
        exclude: tuple[str, ...] = ()

        def __post_init__(self) -> None:
            if self.weight_type not in ("int8", "uint8"):
                raise ValueError(f"weight_type: {self.weight_type!r} is not int8 or uint8")

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        if artifact.meta.get("quantized"):
            raise PassNotApplicable(f"model already quantized ({artifact.meta['quantized']})")

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        from onnxruntime.quantization import quantize_dynamic

        _quiet()
        out = ctx.scratch(self.name) / "model.onnx"
        quantize_dynamic(
            artifact.onnx_path,
            out,
            per_channel=self.config.per_channel,
            reduce_range=self.config.reduce_range,
            weight_type=_qtype(self.config.weight_type),
            op_types_to_quantize=list(self.config.op_types) if self.config.op_types else None,
            nodes_to_exclude=list(self.config.exclude) or None,
            # needed on ORT-fused graphs, where type inference cannot see through contrib ops
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        report = _quant_stats(artifact.onnx_path, out)
        modified = bool(report["quantized_ops"])
        return PassResult(artifact.with_onnx(out, quantized="dynamic"), modified, report)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        check_loads(result.artifact.onnx_path)
        if not result.report["quantized_ops"]:
            raise RuntimeError("no operator was quantized")


class _Reader:
    """``CalibrationDataReader`` over a list of feed dicts (only the graph's inputs)."""

    def __init__(self, batches: list[dict[str, np.ndarray]], names: set[str]) -> None:
        self._batches = [{k: v for k, v in b.items() if k in names} for b in batches]
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._batches):
            return None
        self._index += 1
        return self._batches[self._index - 1]

    def rewind(self) -> None:
        self._index = 0


@register_pass
class QuantizeStatic(Pass):
    """Static INT8 in QDQ format, ranges from calibration data.

    Only ``op_types`` are quantized (static INT8 of every op collapses transformers). With
    ``target_cosine`` set, the most sensitive nodes are found by measurement (each node's
    increase in output error in the quantized graph) and excluded, most sensitive first,
    until the cosine on calibration data reaches the target or ``max_exclude`` is hit.
    """

    name = "quantize_static"
    helps = frozenset({"cpu", "cuda", "tensorrt"})

    @dataclass(frozen=True)
    class Config:
        calibrate_method: str = "minmax"
        per_channel: bool = True
        op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
        activation_type: str = "uint8"
        exclude: tuple[str, ...] = ()
        target_cosine: float | None = None
        max_exclude: int = 16
        calibration_batches: int = 8

        def __post_init__(self) -> None:
            if self.calibrate_method not in ("minmax", "percentile", "entropy"):
                raise ValueError(
                    f"calibrate_method: {self.calibrate_method!r} is not minmax, "
                    "percentile or entropy"
                )
            if self.activation_type not in ("int8", "uint8"):
                raise ValueError(f"activation_type: {self.activation_type!r} is not int8/uint8")

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        if artifact.meta.get("quantized"):
            raise PassNotApplicable(f"model already quantized ({artifact.meta['quantized']})")
        if not ctx.calibration.get("inputs"):
            raise PassNotApplicable("static quantization needs calibration data")

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        _quiet()
        folder = ctx.scratch(f"{self.name}_{self.config.calibrate_method}")
        calib = list(ctx.calibration["inputs"])[: self.config.calibration_batches]
        cache = folder / "calibration.json"
        cache.unlink(missing_ok=True)
        out = folder / "model.onnx"
        excluded = list(self.config.exclude)
        self._quantize(artifact.onnx_path, out, calib, cache, excluded)
        report: dict[str, Any] = {"calibrate_method": self.config.calibrate_method}
        if self.config.target_cosine is not None:
            report["exclusion_search"] = self._exclusion_search(
                artifact, out, calib, cache, excluded, ctx
            )
            excluded = report["exclusion_search"]["excluded"]
        report["excluded_nodes"] = excluded
        report.update(_quant_stats(artifact.onnx_path, out))
        new = artifact.with_onnx(out, quantized=f"static-{self.config.calibrate_method}")
        return PassResult(new, bool(report["quantized_ops"]), report)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        check_loads(result.artifact.onnx_path)

    def _quantize(
        self, source: Path, out: Path, calib: list, cache: Path, excluded: list[str]
    ) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        methods = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }
        names = {i.name for i in onnx.load(str(source), load_external_data=False).graph.input}
        quantize_static(
            source,
            out,
            _Reader(calib, names),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(self.config.op_types),
            per_channel=self.config.per_channel,
            activation_type=_qtype(self.config.activation_type),
            weight_type=_qtype("int8"),
            nodes_to_exclude=excluded or None,
            calibrate_method=methods[self.config.calibrate_method],
            calibration_cache_path=cache,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )

    def _exclusion_search(
        self,
        artifact: Artifact,
        out: Path,
        calib: list,
        cache: Path,
        excluded: list[str],
        ctx: PassContext,
    ) -> dict[str, Any]:
        """Exclude the most sensitive nodes (by measurement) until ``target_cosine`` holds."""
        target = float(self.config.target_cosine or 0.0)
        probe = calib[: max(1, min(2, len(calib)))]
        reference = run_batches(make_session(artifact.onnx_path, "cpu"), probe)

        def cosine_of(path: Path) -> float:
            got = run_batches(make_session(path, "cpu"), probe)
            return compare(reference, got, probe, family=artifact.family)["cosine"]

        steps = [{"excluded": len(excluded), "cosine": cosine_of(out)}]
        if steps[0]["cosine"] >= target:
            return {"ranking": [], "steps": steps, "excluded": excluded}
        ranking = node_sensitivity(artifact.onnx_path, out, probe, self.config.op_types)
        ordered = [name for name, _score in ranking if name not in excluded]
        count = 1
        chosen = list(excluded)
        while ordered and count <= self.config.max_exclude:
            ctx.check_cancelled()
            chosen = excluded + ordered[:count]
            self._quantize(artifact.onnx_path, out, calib, cache, chosen)
            cosine = cosine_of(out)
            steps.append({"excluded": len(chosen), "cosine": cosine})
            ctx.report_progress(f"static INT8: {len(chosen)} sensitive nodes kept in FP32", None)
            if cosine >= target or count >= len(ordered):
                break
            count *= 2
        return {
            "ranking": [{"node": n, "score": s} for n, s in ranking[:20]],
            "steps": steps,
            "excluded": chosen,
        }


def node_sensitivity(
    float_path: Path, quant_path: Path, batches: list, op_types: tuple[str, ...]
) -> list[tuple[str, float]]:
    """Rank quantizable nodes by measured sensitivity, most sensitive first.

    Every candidate node's output is exposed in the float and the quantized graph; a node's
    score is the relative error of its output minus the largest relative error of its inputs
    (the error it adds itself, not what it inherits)."""
    model = onnx.load(str(float_path))
    producers = {out: node for node in model.graph.node for out in node.output}
    nodes = [n for n in model.graph.node if n.op_type in op_types and n.name]
    tensors: set[str] = set()
    for node in nodes:
        tensors.add(node.output[0])
        tensors.update(i for i in node.input[:1] if i in producers)
    floats = _probe(float_path, tensors, batches)
    quants = _probe(quant_path, tensors, batches)

    def rel(name: str) -> float:
        a, b = floats.get(name), quants.get(name)
        if a is None or b is None or a.shape != b.shape:
            return 0.0
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))

    scores = []
    for node in nodes:
        inherited = max((rel(i) for i in node.input[:1] if i in producers), default=0.0)
        scores.append((node.name, rel(node.output[0]) - inherited))
    return sorted(scores, key=lambda item: item[1], reverse=True)


def _probe(path: Path, tensors: set[str], batches: list) -> dict[str, np.ndarray]:
    """Values of ``tensors`` (made graph outputs) over ``batches``, concatenated."""
    import tempfile

    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    produced = {out for node in model.graph.node for out in node.output}
    for name in sorted(tensors):
        if name in produced and name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    with tempfile.TemporaryDirectory() as tmp:
        probe_path = Path(tmp) / "probe.onnx"
        onnx.save_model(model, str(probe_path))
        session = make_session(probe_path, "cpu")
        names = [o.name for o in session.get_outputs()]
        inputs = {i.name for i in session.get_inputs()}
        values: dict[str, list[np.ndarray]] = {}
        for batch in batches:
            outs = session.run(None, {k: v for k, v in batch.items() if k in inputs})
            for name, value in zip(names, outs, strict=True):
                if name in tensors:
                    values.setdefault(name, []).append(np.asarray(value, dtype=np.float64).ravel())
    return {name: np.concatenate(parts) for name, parts in values.items()}
