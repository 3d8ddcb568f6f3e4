"""The ``channel_prune`` pass: retraining-free filter pruning under a FLOPs budget."""

from __future__ import annotations

from dataclasses import dataclass

from optimizers.cnn import graph, prune
from optimizers.cnn.passes.common import calibration_batches, require_float
from optimizers.cnn.torch_graph import TorchGraph, UnsupportedGraph
from optimizers.passes.base import Artifact, Pass, PassContext, PassNotApplicable, PassResult
from optimizers.registry import register_pass


@register_pass
class ChannelPrune(Pass):
    """Rank conv output channels by Fisher importance on the calibration images, remove the
    least important under ``flops_budget`` (conv, its BatchNorm and the next layer's inputs
    physically shrink) and re-estimate BatchNorm statistics; no retraining."""

    name = "channel_prune"
    applies_to = frozenset({"cnn"})
    helps = frozenset({"cpu", "cuda", "tensorrt"})

    @dataclass(frozen=True)
    class Config:
        flops_budget: float = 0.5
        min_keep: float = 0.1
        criterion: str = "fisher_per_flop"
        reestimate: bool = True

        def __post_init__(self) -> None:
            self.options()

        def options(self) -> prune.PruneOptions:
            return prune.PruneOptions(
                self.flops_budget, self.min_keep, self.criterion, self.reestimate
            )

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        require_float(artifact, self.name)
        calibration_batches(ctx, self.name)
        try:
            TorchGraph(graph.load(artifact.onnx_path))
        except UnsupportedGraph as exc:
            raise PassNotApplicable(f"channel_prune: {exc}") from None

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        model = graph.load(artifact.onnx_path)
        ctx.report_progress("channel pruning: Fisher importance on calibration data", None)
        pruned, report = prune.prune_channels(
            model,
            calibration_batches(ctx, self.name),
            self.config.options(),
            check=ctx.check_cancelled,
        )
        if report["macs_after"] >= report["macs_before"]:
            return PassResult(artifact, False, report)
        out = ctx.scratch(self.name) / "model.onnx"
        graph.save(pruned, out)
        meta = {"pruned_macs_ratio": report["macs_ratio"]}
        return PassResult(artifact.with_onnx(out, **meta), True, report)
