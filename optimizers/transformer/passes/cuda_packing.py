"""``ort_packing_mode``: padding removal on GPUs with ONNX Runtime's own packing mode.

ORT's ``convert_to_packing_mode`` rewrites a fused BERT graph (``Attention`` from the
``ort_transformer_optimize`` pass) so that ``RemovePadding`` gathers the real tokens after the
embedding, every layer runs on ``[real_tokens, hidden]`` with ``PackedAttention`` (per-sequence
attention over cumulative sequence lengths), and ``RestorePadding`` scatters the last layer back
to ``[batch, seq, hidden]``. Inputs and outputs are unchanged. These kernels exist in the CUDA
execution provider only; on CPUs the ``pack_padding`` pass (``optimizers.transformer.packing``)
does the same job. Like the fused ``Attention`` it replaces, it expects right-padded batches
(real tokens first, as the tokenizers and the server's variable-length batching produce).

Opt-in: the search times every candidate on one unpadded batch, where removing padding has
nothing to gain; name it in ``allow`` (or ``require``) when the served traffic is padded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from optimizers.onnxutil import load_model, make_session, save_model
from optimizers.passes.base import Artifact, Pass, PassContext, PassNotApplicable, PassResult
from optimizers.registry import register_chains, register_pass

PACKING_OPS = ("RemovePadding", "RestorePadding", "PackedAttention", "PackedMultiHeadAttention")


def cuda_unavailable_reason() -> str | None:
    """Why this ONNX Runtime cannot run packed graphs here, or None when it can."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            "ORT's packing kernels (RemovePadding, PackedAttention) exist only in the CUDA "
            "execution provider, which this onnxruntime lacks; on CPUs use pack_padding"
        )
    return None


def convert_to_packing_mode(model):  # onnx.ModelProto -> (onnx.ModelProto, Counter)
    """``model`` in ORT's packing mode and the packing operators it now holds."""
    from onnxruntime.transformers.convert_to_packing_mode import PackingMode
    from onnxruntime.transformers.onnx_model import OnnxModel

    packing = PackingMode(OnnxModel(model))
    packing.convert(use_symbolic_shape_infer=True)
    converted = packing.model.model
    ops = Counter(n.op_type for n in converted.graph.node if n.op_type in PACKING_OPS)
    return converted, ops


@register_pass
class OrtPackingMode(Pass):
    """Padding removal on CUDA: RemovePadding -> PackedAttention layers -> RestorePadding."""

    name = "ort_packing_mode"
    applies_to = frozenset({"transformer"})
    helps = frozenset({"cuda"})
    opt_in = True

    @dataclass(frozen=True)
    class Config:
        pass

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        if ctx.target != "cuda":
            raise PassNotApplicable(f"{self.name} runs on the cuda target, not {ctx.target}")
        reason = cuda_unavailable_reason()
        if reason:
            raise PassNotApplicable(reason)
        if not artifact.meta.get("fused"):
            raise PassNotApplicable(
                f"{self.name} rewrites ORT's fused Attention: run ort_transformer_optimize first"
            )

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        converted, ops = convert_to_packing_mode(load_model(artifact.onnx_path))
        if not ops.get("RemovePadding"):
            raise PassNotApplicable(
                "ORT's packing converter found no Attention with one shared mask index to pack "
                "(the fusion must see the attention mask)"
            )
        out = save_model(converted, ctx.scratch(self.name) / "model.onnx")
        report = {"packing_operators": dict(ops)}
        return PassResult(artifact.with_onnx(out, packed=True), True, report)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        session = make_session(result.artifact.onnx_path, "cuda")
        if session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"the packed graph did not load on CUDA: {session.get_providers()}")


# FP16 first (its converter knows the fused ops), then packing; opt-in, see the module docstring
register_chains(
    "transformer",
    [["ort_transformer_optimize", "fp16", "ort_packing_mode"]],
)
