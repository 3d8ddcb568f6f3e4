"""The ``cnn_static_int8`` pass: calibrated static QDQ INT8 with sensitive-layer exclusion."""

from __future__ import annotations

from dataclasses import dataclass

from optimizers.cnn import int8
from optimizers.cnn.passes.common import calibration_batches, evaluation, require_float
from optimizers.passes.base import Artifact, Pass, PassContext, PassResult
from optimizers.registry import register_pass


@register_pass
class CnnStaticInt8(Pass):
    """Conv+BN folding (ORT pre-processing), static QDQ INT8 with per-channel weights; the
    calibration method (MinMax / Percentile / Entropy) that scores best on held-out data is
    kept, and the most sensitive layers (measured one at a time) stay in float until the
    accuracy bound holds (accuracy with labels, top-1 agreement without)."""

    name = "cnn_static_int8"
    applies_to = frozenset({"cnn"})
    helps = frozenset({"cpu", "cuda", "tensorrt"})

    @dataclass(frozen=True)
    class Config:
        methods: tuple[str, ...] = int8.METHODS
        per_channel: bool = True
        activation_type: str = "uint8"
        max_accuracy_drop: float = 0.01
        min_agreement: float = 0.99
        max_excluded: int = 6
        target_cosine: float | None = None  # the request's min_cosine, when the search sets it

        def __post_init__(self) -> None:
            self.options()  # validates, naming the bad field

        def options(self) -> int8.Int8Options:
            return int8.Int8Options(
                methods=tuple(self.methods),
                per_channel=self.per_channel,
                activation_type=self.activation_type,
                max_accuracy_drop=self.max_accuracy_drop,
                min_agreement=self.min_agreement,
                max_excluded=self.max_excluded,
                min_cosine=self.target_cosine,
            )

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        require_float(artifact, self.name)
        calibration_batches(ctx, self.name)

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        held, labels = evaluation(ctx)
        path, report = int8.quantize_cnn(
            artifact.onnx_path,
            ctx.scratch(self.name),
            calibration_batches(ctx, self.name),
            int8.Evaluation(held, labels),
            self.config.options(),
            check=ctx.check_cancelled,
            progress=lambda message: ctx.report_progress(f"static INT8: {message}", None),
        )
        new = artifact.with_onnx(path, quantized=f"static-qdq-{report['method']}")
        return PassResult(new, True, report)
