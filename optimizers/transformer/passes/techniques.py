"""``struct_prune``, ``token_prune`` and ``pack_padding`` as pipeline passes, plus their chains.

Each takes the transformer ONNX artifact the search starts from (the BERT-family weights come
from the recorded Hugging Face checkpoint, or from the ``SlimEncoder`` a previous pass of this
package attached), applies its technique in PyTorch and exports a new ONNX graph with the
original's inputs and first output (``last_hidden_state``), so fidelity compares like for like.
"""

from __future__ import annotations

from dataclasses import dataclass

from optimizers.passes.base import Artifact, Pass, PassContext, PassResult
from optimizers.registry import register_chains, register_pass
from optimizers.transformer.encoder import PooledEncoder
from optimizers.transformer.export import export_onnx
from optimizers.transformer.ltp import LTPConfig
from optimizers.transformer.packing import PackedEncoder
from optimizers.transformer.passes.source import (
    calibration_batches,
    check_applicable,
    original_encoder,
    output_name,
    source_encoder,
)
from optimizers.transformer.structured_prune import PruneConfig, structured_prune
from optimizers.transformer.token_prune import HiddenStateOnly, TokenPruneConfig, token_prune


class _TransformerPass(Pass):
    input_kind = "onnx"
    applies_to = frozenset({"transformer"})

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        check_applicable(artifact, self.name)

    def _export(self, module, artifact: Artifact, ctx: PassContext, slim, **meta) -> Artifact:
        path = ctx.scratch(self.name) / "model.onnx"
        export_onnx(
            module,
            path,
            input_names=list(artifact.meta.get("input_names") or []),
            first_output=output_name(artifact),
        )
        return Artifact(
            "onnx",
            artifact.family,
            onnx_path=path,
            torch_model=slim,
            meta={**artifact.meta, **meta},
        )


@register_pass
class StructPrune(_TransformerPass):
    """Retraining-free structured pruning of heads and FFN neurons: Kwon et al.'s (2022)
    Fisher search for the per-layer counts, then ``selection="obs"`` (structured OBS choice
    and compensation, see ``obs_selection``) or ``"fisher"`` (Kwon's rearrangement and mask
    tuning, then the output projections refitted by least squares with ``refit``)."""

    name = "struct_prune"

    @dataclass(frozen=True)
    class Config:
        flops_keep: float = 0.6
        rearrange: bool = True
        tune: bool = True
        max_batches: int = 32
        refit: bool = True
        selection: str = "obs"

        def __post_init__(self) -> None:
            # validates, naming the field
            PruneConfig(flops_keep=self.flops_keep, selection=self.selection)

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        encoder = source_encoder(artifact)
        cfg = PruneConfig(
            flops_keep=self.config.flops_keep,
            seq_len=ctx.seq_len,
            rearrange=self.config.rearrange,
            tune=self.config.tune,
            max_batches=self.config.max_batches,
            refit=self.config.refit,
            selection=self.config.selection,
        )
        # built-in text comes with more sentences for weight fitting (``pruning_inputs``);
        # a user's calibration file is used as given
        batches = ctx.calibration.get("pruning_inputs") or calibration_batches(ctx, self.name)
        pruned, report = structured_prune(
            encoder,
            batches,
            cfg,
            # messages only: the search owns the job's overall fraction
            progress=lambda message, _fraction: ctx.report_progress(message, None),
            check=ctx.check_cancelled,
        )
        new = self._export(
            HiddenStateOnly(PooledEncoder(pruned)), artifact, ctx, pruned, struct_pruned=True
        )
        return PassResult(new, True, report)


@register_pass
class TokenPrune(_TransformerPass):
    """Attention-importance token pruning; thresholds learned as in LTP (or calibrated)."""

    name = "token_prune"

    @dataclass(frozen=True)
    class Config:
        final_keep: float | None = None
        target_cosine: float = 0.99
        margin: float = 0.002
        start_layer: int = 0
        steps: int = 5
        method: str = "learned"
        """learned (LTP soft-mask distillation, then shifted to the bound) | calibrated"""
        pool: str = "survivors"
        """how dropped tokens' rows are filled: survivors | carry | frozen"""
        ltp_steps: int = 100
        keep_weight: float = 0.02

        def __post_init__(self) -> None:
            TokenPruneConfig(
                final_keep=self.final_keep,
                min_cosine=self.target_cosine,
                start_layer=self.start_layer,
                method=self.method,
                pool=self.pool,
                ltp=LTPConfig(steps=self.ltp_steps, keep_weight=self.keep_weight),
            )

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        encoder = source_encoder(artifact)
        reference = original_encoder(artifact) if artifact.meta.get("struct_pruned") else None
        cfg = TokenPruneConfig(
            final_keep=self.config.final_keep,
            min_cosine=min(1.0, self.config.target_cosine + self.config.margin),
            start_layer=self.config.start_layer,
            steps=self.config.steps,
            method=self.config.method,
            pool=self.config.pool,
            ltp=LTPConfig(steps=self.config.ltp_steps, keep_weight=self.config.keep_weight),
        )
        model, report = token_prune(
            encoder,
            calibration_batches(ctx, self.name),
            cfg,
            check=ctx.check_cancelled,
            reference=reference,
        )
        if all(t is None for t in model.thresholds):
            return PassResult(artifact, False, {**report, "why": "no threshold met the bound"})
        new = self._export(HiddenStateOnly(model), artifact, ctx, None, token_pruned=True)
        return PassResult(new, True, report)


@register_pass
class PackPadding(_TransformerPass):
    """Padding removal: dense layers on packed real tokens, attention per sequence."""

    name = "pack_padding"

    @dataclass(frozen=True)
    class Config:
        pass

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        encoder = source_encoder(artifact)
        new = self._export(
            HiddenStateOnly(PackedEncoder(encoder)), artifact, ctx, None, packed=True
        )
        report = {"technique": "padding removal (packed dense layers, per-sequence attention)"}
        return PassResult(new, True, report)


register_chains(
    "transformer",
    [
        ["struct_prune", "ort_transformer_optimize", "quantize_dynamic"],
        ["struct_prune", "token_prune", "ort_transformer_optimize", "quantize_dynamic"],
        ["token_prune", "ort_transformer_optimize", "quantize_dynamic"],
        [("struct_prune", {"flops_keep": 0.8}), "ort_transformer_optimize", "quantize_dynamic"],
        # the combined candidates (issue 4): mild structured pruning, then token pruning; every
        # prefix (struct alone, struct + tokens, + fusion, + unfusing the ops slow on ORT's
        # CPU provider) is measured as a candidate too
        [
            ("struct_prune", {"flops_keep": 0.9}),
            "token_prune",
            "ort_transformer_optimize",
            "cpu_unfuse",
            "quantize_dynamic",
        ],
        [
            ("struct_prune", {"flops_keep": 0.8}),
            "token_prune",
            "ort_transformer_optimize",
            "cpu_unfuse",
            "quantize_dynamic",
        ],
        ["token_prune", "ort_transformer_optimize", "cpu_unfuse", "quantize_dynamic"],
        # Attention as Q/K/V MatMuls + MHA that skips the mask on unpadded batches: measured
        # side by side with the default cpu_unfuse chain (which one wins depends on padding)
        ["ort_transformer_optimize", ("cpu_unfuse", {"attention": True}), "quantize_dynamic"],
        ["pack_padding", "quantize_dynamic"],
    ],
)
