"""Graph optimization passes: ONNX Runtime's transformer optimizer (BERT-family fusions) and
ONNX Runtime's offline graph optimization for any other graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optimizers.onnxutil import check_loads, op_counts
from optimizers.passes.base import (
    Artifact,
    Pass,
    PassContext,
    PassNotApplicable,
    PassResult,
)
from optimizers.registry import register_pass

FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization")


def fused_statistics(optimizer_model: Any) -> dict[str, int]:
    """Non-zero fused-operator counts from an ORT ``OnnxModel`` after optimization."""
    stats = optimizer_model.get_fused_operator_statistics()
    return {name: int(count) for name, count in stats.items() if count}


def bert_fusion(
    path: Any, meta: dict[str, Any], opt_level: int = 1, *, use_gpu: bool = False
) -> Any:
    """Run ORT's transformer optimizer on ``path``; returns the optimized ``OnnxModel``.

    ``use_gpu``: ORT's basic graph optimizations run on the CUDA provider (what a ``cuda``
    target serves on; without one installed ORT skips them and the fusions still run)."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    model_type = meta.get("ort_model_type") or "bert"
    options = FusionOptions(model_type)
    return optimize_model(
        str(path),
        model_type=model_type,
        num_heads=int(meta.get("num_heads") or 0),
        hidden_size=int(meta.get("hidden_size") or 0),
        optimization_options=options,
        opt_level=opt_level,
        use_gpu=use_gpu,
    )


@register_pass
class TransformerOptimize(Pass):
    """ORT transformer optimizer: Attention, SkipLayerNorm, EmbedLayerNorm, (Bias)GELU fusions."""

    name = "ort_transformer_optimize"
    applies_to = frozenset({"transformer"})
    helps = frozenset({"cpu", "cuda", "tensorrt"})

    @dataclass(frozen=True)
    class Config:
        opt_level: int = 1
        """0: only the python fusions; 1 (ORT's default for BERT): also ORT's basic passes."""
        require_attention: bool = False
        """Fail when no Attention node was fused (a hint the export defeated the fusion)."""

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        model = bert_fusion(
            artifact.onnx_path, artifact.meta, self.config.opt_level, use_gpu=ctx.target == "cuda"
        )
        stats = fused_statistics(model)
        if self.config.require_attention and not any(
            stats.get(op) for op in ("Attention", "MultiHeadAttention")
        ):
            raise RuntimeError(f"no attention fused (fused operators: {stats or 'none'})")
        out = ctx.scratch(self.name) / "model.onnx"
        model.save_model_to_file(str(out))
        before = op_counts(artifact.onnx_path)
        after = op_counts(out)
        report = {
            "fused_operators": stats,
            "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()),
        }
        return PassResult(artifact.with_onnx(out, fused=True), bool(stats), report)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        check_loads(result.artifact.onnx_path)


@register_pass
class OrtGraphOptimize(Pass):
    """ONNX Runtime's own graph optimizations, applied offline and saved."""

    name = "ort_graph_optimize"
    applies_to = frozenset({"generic"})

    @dataclass(frozen=True)
    class Config:
        level: str = "extended"
        """basic | extended | all (``all`` adds layout changes specific to this machine)."""

        def __post_init__(self) -> None:
            if self.level not in ("basic", "extended", "all"):
                raise ValueError(f"level: {self.level!r} is not basic, extended or all")

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        if artifact.meta.get("fused"):
            raise PassNotApplicable("graph already optimized by the transformer optimizer")

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        import onnxruntime as ort

        levels = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        out = ctx.scratch(self.name) / "model.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[self.config.level]
        options.optimized_model_filepath = str(out)
        options.log_severity_level = 3
        ort.InferenceSession(str(artifact.onnx_path), options, providers=["CPUExecutionProvider"])
        before, after = op_counts(artifact.onnx_path), op_counts(out)
        report = {
            "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()),
            "ops_after": after,
        }
        modified = before != after
        return PassResult(artifact.with_onnx(out, ort_optimized=True), modified, report)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        check_loads(result.artifact.onnx_path)
