"""The ``winograd`` pass: F(2x2,3x3) where measured faster and accurate (CPU); cuDNN search."""

from __future__ import annotations

from dataclasses import dataclass

from optimizers.cnn import graph, winograd, winograd_select
from optimizers.cnn.passes.common import require_float
from optimizers.passes.base import Artifact, Pass, PassContext, PassNotApplicable, PassResult
from optimizers.registry import register_pass

GPU_SETTING = {"cudnn_conv_algo_search": "EXHAUSTIVE"}


@register_pass
class WinogradPass(Pass):
    """Rewrite eligible 3x3 stride-1 convolutions into Winograd F(2x2,3x3), layer by layer,
    keeping each rewrite only where it measured faster than ONNX Runtime's direct convolution
    (at the job's batch size) and inside the error bound against float64 direct convolution.

    On GPU targets the graph is left alone: the engine configuration asks cuDNN for an
    exhaustive algorithm search (``cudnn_conv_algo_search=EXHAUSTIVE``; TensorRT's tactic
    selection does the same), which picks cuDNN's Winograd kernels where they win.
    """

    name = "winograd"
    applies_to = frozenset({"cnn"})
    helps = frozenset({"cpu", "cuda", "tensorrt"})

    @dataclass(frozen=True)
    class Config:
        min_speedup: float = 1.0
        max_rel_error: float = 1e-4
        repeats: int = 5
        tiles: tuple[int, ...] = (2, 4)

        def __post_init__(self) -> None:
            if self.min_speedup < 0:
                raise ValueError(f"min_speedup must be >= 0, got {self.min_speedup}")
            if self.max_rel_error < 0:
                raise ValueError(f"max_rel_error must be >= 0, got {self.max_rel_error}")
            if self.repeats < 1:
                raise ValueError(f"repeats must be >= 1, got {self.repeats}")

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        require_float(artifact, self.name)
        if ctx.target != "cpu":
            raise PassNotApplicable(
                f"on {ctx.target} the graph keeps its convolutions: the engine config sets "
                "cudnn_conv_algo_search=EXHAUSTIVE (TensorRT: tactic selection), so cuDNN's own "
                "Winograd kernels are chosen where measured faster"
            )

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        model = graph.load(artifact.onnx_path)
        options = winograd_select.SelectOptions(
            batch_size=max(1, ctx.batch_size),
            min_speedup=self.config.min_speedup,
            max_rel_error=self.config.max_rel_error,
            repeats=self.config.repeats,
            tiles=tuple(self.config.tiles),
        )
        ctx.report_progress("winograd: measuring every conv layer", None)
        chosen, rows = winograd_select.select(model, options, ctx.check_cancelled)
        report = {
            "algorithms": [f"F({m}x{m},3x3)" for m in self.config.tiles],
            "batch_size": options.batch_size,
            "layers": rows,
            "rewritten": len(chosen),
            "gpu_engine_setting": GPU_SETTING,
        }
        if not chosen:
            return PassResult(artifact, False, report)
        out = ctx.scratch(self.name) / "model.onnx"
        infos = [info for info, _ in chosen.values()]
        tiles = {name: m for name, (_, m) in chosen.items()}
        graph.save(winograd.rewrite(model, infos, tiles), out)
        return PassResult(artifact.with_onnx(out, winograd=len(chosen)), True, report)
