"""Low-rank factorization: large constant MatMul/Gemm weights ``W ≈ A @ B`` by truncated SVD.

The rank keeps ``energy`` of the squared singular values (or, with ``max_error``, the
smallest rank whose relative Frobenius error is below it); a weight is only replaced when
the factors are smaller than ``max_param_ratio`` of the original."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from optimizers.onnxutil import check_loads, load_model, save_model
from optimizers.passes.base import Artifact, Pass, PassContext, PassNotApplicable, PassResult
from optimizers.registry import register_pass


def choose_rank(singular: np.ndarray, energy: float | None, max_error: float | None) -> int:
    """Smallest rank keeping ``energy`` of sum(s^2), or with relative error <= ``max_error``."""
    squares = singular.astype(np.float64) ** 2
    total = squares.sum()
    if total == 0:
        return 1
    kept = np.cumsum(squares) / total
    if max_error is not None:
        # relative Frobenius error of rank r: sqrt(1 - kept[r-1])
        errors = np.sqrt(np.clip(1.0 - kept, 0.0, None))
        return int(np.argmax(errors <= max_error) + 1) if (errors <= max_error).any() else len(kept)
    threshold = energy if energy is not None else 0.99
    return int(np.searchsorted(kept, threshold - 1e-12) + 1)


@register_pass
class LowRank(Pass):
    """Truncated-SVD factorization of large MatMul/Gemm weights into two thinner MatMuls."""

    name = "lowrank"
    helps = frozenset({"cpu", "cuda", "tensorrt"})

    @dataclass(frozen=True)
    class Config:
        energy: float = 0.95
        max_error: float | None = None
        max_param_ratio: float = 0.8
        min_elements: int = 4096
        rank_multiple: int = 8

        def __post_init__(self) -> None:
            if not 0.0 < self.energy <= 1.0:
                raise ValueError(f"energy: must be in (0, 1], got {self.energy}")
            if self.max_error is not None and not 0.0 < self.max_error < 1.0:
                raise ValueError(f"max_error: must be in (0, 1), got {self.max_error}")

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        super().requires(artifact, ctx)
        if artifact.meta.get("quantized"):
            raise PassNotApplicable("low-rank factorization applies to float weights")

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        model = load_model(artifact.onnx_path)
        graph = model.graph
        inits = {init.name: init for init in graph.initializer}
        uses: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
        new_nodes: list[onnx.NodeProto] = []
        self._new_inits: list[onnx.TensorProto] = []
        self._skipped: list[dict[str, Any]] = []
        factors: list[dict[str, Any]] = []
        params_before = params_after = 0
        for node in graph.node:
            replaced = self._factorize(node, inits, new_nodes, factors)
            if replaced is None:
                new_nodes.append(node)
                continue
            before, after = replaced
            params_before += before
            params_after += after
        if not factors:
            report = {
                "factorized": [],
                "reason": "no weight benefits at this threshold",
                "not_worth_it": self._skipped[:50],
            }
            return PassResult(artifact, False, report)
        for info in factors:
            weight = info["weight"]
            uses[weight] -= 1
            if uses[weight] == 0 and weight in inits:
                graph.initializer.remove(inits.pop(weight))
                for value in list(graph.input):
                    if value.name == weight:
                        graph.input.remove(value)
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.initializer.extend(self._new_inits)
        out = save_model(model, ctx.scratch(self.name) / "model.onnx")
        report = {
            "factorized": factors,
            "params_before": params_before,
            "params_after": params_after,
            "size_before": artifact.size_bytes(),
            "size_after": out.stat().st_size,
        }
        return PassResult(artifact.with_onnx(out, lowrank=True), True, report)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        if result.modified:
            check_loads(result.artifact.onnx_path)

    # -- one node --------------------------------------------------------------------------
    def _factorize(
        self,
        node: onnx.NodeProto,
        inits: dict[str, onnx.TensorProto],
        out: list[onnx.NodeProto],
        factors: list[dict[str, Any]],
    ) -> tuple[int, int] | None:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            return None
        weight_name = node.input[1]
        init = inits.get(weight_name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            return None
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and bool(node.input[2])
        beta = float(attrs.get("beta", 1.0))
        if has_bias and beta != 1.0 and node.input[2] not in inits:
            return None
        weight = numpy_helper.to_array(init).astype(np.float64)
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            weight = weight.T
        rows, cols = weight.shape
        if rows * cols < self.config.min_elements:
            return None
        # singular values first (cheap): most trained weights need too high a rank to gain
        singular = np.linalg.svd(weight.astype(np.float32), compute_uv=False)
        rank = choose_rank(singular, self.config.energy, self.config.max_error)
        multiple = max(1, self.config.rank_multiple)
        rank = min(len(singular), -(-rank // multiple) * multiple)
        if rank * (rows + cols) > self.config.max_param_ratio * rows * cols:
            self._skipped.append({"node": node.name, "shape": [rows, cols], "rank_needed": rank})
            return None
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        alpha = float(attrs.get("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        first = (u[:, :rank] * s[:rank] * alpha).astype(np.float32)
        second = vt[:rank].astype(np.float32)
        base = f"{node.name or weight_name}_lowrank"
        a_name, b_name = f"{base}_A", f"{base}_B"
        inits[a_name] = numpy_helper.from_array(first, a_name)
        inits[b_name] = numpy_helper.from_array(second, b_name)
        self._new_inits.extend([inits[a_name], inits[b_name]])
        middle = f"{base}_mid"
        out.append(helper.make_node("MatMul", [node.input[0], a_name], [middle], name=f"{base}_1"))
        if has_bias:
            product = f"{base}_prod"
            out.append(helper.make_node("MatMul", [middle, b_name], [product], name=f"{base}_2"))
            bias = node.input[2]
            if beta != 1.0:
                scaled = numpy_helper.to_array(inits[bias]) * beta
                bias = f"{base}_bias"
                inits[bias] = numpy_helper.from_array(scaled.astype(np.float32), bias)
                self._new_inits.append(inits[bias])
            out.append(helper.make_node("Add", [product, bias], list(node.output), name=base))
        else:
            out.append(
                helper.make_node("MatMul", [middle, b_name], list(node.output), name=f"{base}_2")
            )
        approx = (first.astype(np.float64) / alpha) @ second
        error = float(np.linalg.norm(weight - approx) / max(np.linalg.norm(weight), 1e-12))
        factors.append(
            {
                "node": node.name,
                "weight": weight_name,
                "shape": [rows, cols],
                "rank": rank,
                "relative_error": error,
            }
        )
        return rows * cols, rank * (rows + cols)
