"""FP16 conversion that keeps FP32 graph inputs and outputs (casts inserted at the edges)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from optimizers.onnxutil import check_loads, load_model, save_model
from optimizers.passes.base import Artifact, Pass, PassContext, PassNotApplicable, PassResult
from optimizers.registry import register_pass


def with_value_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the element type of every intermediate tensor recorded (value_info).

    The FP16 converter inserts the casts around the ops it keeps in FP32 (e.g. ``Max`` in a
    sentence-transformers pooling head) only where it knows a tensor's type; after ORT's
    fused contrib ops (``Attention``, ``SkipLayerNormalization``) plain ONNX shape inference
    knows none, and the converted graph would not load. ORT's symbolic shape inference knows
    the contrib ops; where it fails, ONNX's own inference is the fallback.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # an op it has no rule for: ONNX's inference still covers standard ops
        inferred = None
    return inferred if inferred is not None else onnx.shape_inference.infer_shapes(model)


@register_pass
class Float16(Pass):
    """Weights and compute in FP16 for GPU targets; callers still send and get FP32.

    Helps CUDA/TensorRT; on the CPU provider it is measured and normally dropped."""

    name = "fp16"
    helps = frozenset({"cuda", "tensorrt"})

    @dataclass(frozen=True)
    class Config:
        keep_io_types: bool = True
        op_block_list: tuple[str, ...] = ()

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        if artifact.meta.get("quantized"):
            raise PassNotApplicable("model is INT8-quantized; FP16 applies to float graphs")

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        model = with_value_types(load_model(artifact.onnx_path))
        converted = convert_float_to_float16(
            model,
            keep_io_types=self.config.keep_io_types,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(self.config.op_block_list),
        )
        out = save_model(converted, ctx.scratch(self.name) / "model.onnx")
        report = {
            "size_before": artifact.onnx_path.stat().st_size,
            "size_after": out.stat().st_size,
            "casts": sum(1 for n in converted.graph.node if n.op_type == "Cast"),
        }
        return PassResult(artifact.with_onnx(out, precision="fp16"), True, report)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        check_loads(result.artifact.onnx_path)
        if self.config.keep_io_types:
            model = onnx.load(str(result.artifact.onnx_path), load_external_data=False)
            for value in [*model.graph.input, *model.graph.output]:
                if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
                    raise RuntimeError(f"graph I/O {value.name!r} became FP16")
