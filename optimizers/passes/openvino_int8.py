"""INT8 for OpenVINO: NNCF post-training quantization of the ONNX graph (QDQ), run by
ONNX Runtime's OpenVINO plugin EP.

On all-MiniLM-L6-v2 (batch 8 x 128, 1 thread) NNCF INT8 through OpenVINO ran at ~3x PyTorch
eager at held cosine 0.998, against ~2.3x / 0.993 for the best ORT-CPU route (fused +
``cpu_unfuse`` + dynamic INT8); the same QDQ graph on ORT's CPU provider is slower than FP32
(bench/RESULTS.md, "INT8 routes"). The candidate carries ``meta["cpu_accelerator"] =
"openvino"``: the search times and checks it on that EP and a published version's config names
``cpu_execution_accelerator { name: "openvino" }``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import onnx

from optimizers.onnxutil import check_loads, load_model, save_model
from optimizers.passes.base import Artifact, Pass, PassContext, PassNotApplicable, PassResult
from optimizers.passes.quantize import _quant_stats
from optimizers.registry import register_chains, register_pass

ACCELERATOR = "openvino"


def _unusable() -> str | None:
    """Why this pass cannot run here (plugin or NNCF missing), or None."""
    from serving.backends import openvino

    reason = openvino.unavailable_reason()
    if reason:
        return f"OpenVINO plugin EP unavailable ({reason})"
    try:
        import nncf  # noqa: F401
    except ImportError:
        return "nncf is not installed (pip install 'slimserve[openvino]')"
    return None


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMuls with no constant operand (attention's Q·Kᵀ and P·V): constants
    are initializers, ``Constant`` outputs and what nodes compute from constants alone."""
    constant = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.input and all(i in constant for i in node.input)):
            constant.update(node.output)
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and node.name and not constant.intersection(node.input)
    ]


@register_pass
class OpenVinoInt8(Pass):
    """NNCF INT8 (per-channel symmetric weights, per-tensor activations; SmoothQuant and fast
    bias correction by default) on the unfused ONNX graph, served through OpenVINO."""

    name = "openvino_int8"
    helps = frozenset({"cpu"})

    @dataclass(frozen=True)
    class Config:
        smooth_quant: bool = True
        preset: str = "performance"
        subset_size: int = 300
        """Calibration samples (batches of ``ctx.calibration["inputs"]``) NNCF reads at most."""
        fast_bias_correction: bool = True
        quantize_attention: bool = False
        """Also quantize the activation x activation MatMuls (Q·Kᵀ, P·V). Off: OpenVINO keeps
        attention in its float (bf16 on AMX) kernels, which was faster at equal cosine."""

        def __post_init__(self) -> None:
            if self.preset not in ("performance", "mixed"):
                raise ValueError(f"preset: {self.preset!r} is not performance or mixed")
            if self.subset_size < 1:
                raise ValueError("subset_size must be >= 1")

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        if artifact.meta.get("quantized"):
            raise PassNotApplicable(f"model already quantized ({artifact.meta['quantized']})")
        if artifact.meta.get("fused"):
            raise PassNotApplicable("needs the standard-op graph, not ORT's fused contrib ops")
        if ctx.target != "cpu":
            raise PassNotApplicable("OpenVINO INT8 is a CPU route")
        if not ctx.calibration.get("inputs"):
            raise PassNotApplicable("NNCF INT8 needs calibration data")
        reason = _unusable()
        if reason:
            raise PassNotApplicable(reason)

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            AdvancedSmoothQuantParameters,
        )

        logging.getLogger("nncf").setLevel(logging.ERROR)
        model = load_model(artifact.onnx_path)
        names = {i.name for i in model.graph.input}
        data = [
            {k: v for k, v in batch.items() if k in names} for batch in ctx.calibration["inputs"]
        ]
        options: dict[str, Any] = {
            "model_type": nncf.ModelType.TRANSFORMER if artifact.family == "transformer" else None,
            "preset": nncf.QuantizationPreset(self.config.preset),
            "subset_size": min(self.config.subset_size, len(data)),
            "fast_bias_correction": self.config.fast_bias_correction,
        }
        attention = [] if self.config.quantize_attention else activation_matmuls(model)
        if attention:
            options["ignored_scope"] = nncf.IgnoredScope(names=attention)
        if not self.config.smooth_quant:
            options["advanced_parameters"] = AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)
            )
        ctx.report_progress(f"NNCF INT8: calibrating on {options['subset_size']} batches", None)
        quantized = nncf.quantize(model, nncf.Dataset(data), **options)
        out = save_model(quantized, ctx.scratch(self.name) / "model.onnx")
        report: dict[str, Any] = {
            "accelerator": ACCELERATOR,
            "smooth_quant": self.config.smooth_quant,
            "calibration_batches": options["subset_size"],
            "float_attention_matmuls": len(attention),
            **_quant_stats(artifact.onnx_path, out),
        }
        new = artifact.with_onnx(out, quantized="nncf-int8", cpu_accelerator=ACCELERATOR)
        return PassResult(new, bool(report["quantized_ops"]), report)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        path = result.artifact.onnx_path
        onnx.checker.check_model(str(path))
        check_loads(path)


# the exported (unfused) transformer graph, with and without SmoothQuant: the search keeps the
# faster one within the fidelity bound; not applicable (reported) without the plugin
register_chains(
    "transformer", [[(OpenVinoInt8.name, {})], [(OpenVinoInt8.name, {"smooth_quant": False})]]
)
