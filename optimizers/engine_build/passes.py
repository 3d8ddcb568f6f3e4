"""The ``tensorrt_build`` pass: the ONNX artifact compiled into a TensorRT plan.

The ONNX graph is kept as the artifact (fidelity and ONNX Runtime measurements still use it);
the plan and its sidecar are recorded in ``meta["tensorrt_plan"]`` for publishing as a
``tensorrt_plan`` version. Not applicable (with the reason) without TensorRT or a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from optimizers.onnxutil import graph_io
from optimizers.passes.base import Artifact, Pass, PassContext, PassNotApplicable, PassResult
from optimizers.registry import register_pass
from serving.backends.tensorrt import metadata_path, probe_environment, read_metadata
from serving.errors import ModelNotReady


@register_pass
class TensorRTBuild(Pass):
    """Build a strongly typed TensorRT engine with one profile around the request's shapes."""

    name = "tensorrt_build"
    helps = frozenset({"tensorrt"})

    @dataclass(frozen=True)
    class Config:
        max_batch: int = 32
        """Largest batch the profile accepts (raised to the request's batch size if smaller)."""
        max_seq: int = 512
        """Longest sequence the profile accepts (raised to the request's length if smaller)."""
        workspace_bytes: int = 1 << 30
        device: int = 0
        timing_cache: bool = True
        """Keep ``timing.cache`` in the work dir so later builds reuse kernel timings."""

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        try:
            probe_environment(self.config.device)
        except ModelNotReady as exc:
            raise PassNotApplicable(f"{self.name} needs TensorRT and a GPU: {exc}") from None

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        from optimizers.engine_build.tensorrt import build_engine, profiles_for

        specs, _outputs = graph_io(artifact.onnx_path)
        inputs = [
            (s.name, [d if isinstance(d, int) and d > 0 else -1 for d in s.dims]) for s in specs
        ]
        profile = profiles_for(
            inputs,
            ctx.batch_size,
            max(self.config.max_batch, ctx.batch_size),
            ctx.seq_len,
            max(self.config.max_seq, ctx.seq_len),
        )
        out_dir = ctx.scratch(self.name)
        plan = build_engine(
            artifact.onnx_path,
            out_dir,
            profiles=[profile],
            workspace_bytes=self.config.workspace_bytes,
            timing_cache=ctx.workdir / "timing.cache" if self.config.timing_cache else None,
            device=self.config.device,
        )
        metadata = json.loads(metadata_path(plan).read_text(encoding="utf-8"))
        report = {
            "plan_bytes": plan.stat().st_size,
            "tensorrt_version": metadata["tensorrt_version"],
            "gpu": metadata["gpu_name"],
            "compute_capability": metadata["compute_capability"],
            "profile": metadata["profiles"][0],
        }
        result = artifact.with_onnx(artifact.onnx_path, tensorrt_plan=str(plan))
        return PassResult(result, True, report)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        plan = result.artifact.meta.get("tensorrt_plan")
        if not plan:
            raise RuntimeError("no plan was recorded")
        read_metadata(Path(plan))  # sidecar exists and parses
