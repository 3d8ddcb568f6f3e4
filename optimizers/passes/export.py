"""Export a PyTorch model (Hugging Face or ``torch.export``) to ONNX, with a parity check.

Transformers are exported with dynamic batch and sequence axes. ``torch.onnx.export(dynamo=
True)`` (torch's default) can produce graphs on which ONNX Runtime's BERT fusions find no
Attention; in ``auto`` mode the fused-operator statistics are checked and the legacy
(TorchScript) exporter is used when the dynamo graph does not fuse.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optimizers.onnxutil import check_loads, load_model, make_session, save_model
from optimizers.passes.base import Artifact, Pass, PassContext, PassResult
from optimizers.registry import register_pass

ATTENTION_OPS = ("Attention", "MultiHeadAttention")


class _Wrapper:
    """Positional inputs -> the model's first output tensor (e.g. ``last_hidden_state``)."""

    def __new__(cls, model: Any, input_names: list[str]) -> Any:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args: Any) -> Any:
                out = self.model(**dict(zip(input_names, args, strict=True)))
                if isinstance(out, torch.Tensor):
                    return out
                if isinstance(out, dict):
                    return next(iter(out.values()))
                return out[0]

        return Wrapped().eval()


def first_output_name(model: Any, feeds: dict[str, Any]) -> str:
    """Name of the first field of a Hugging Face ``ModelOutput`` (``output`` for tensors)."""
    import torch

    with torch.inference_mode():
        out = model(**feeds)
    if isinstance(out, dict):
        return str(next(iter(out.keys())))
    return "output"


@register_pass
class Export(Pass):
    """torch / Hugging Face / torch.export -> ONNX, output parity checked against the source."""

    name = "export"
    input_kind = "torch"
    applies_to = frozenset({"generic"})

    @dataclass(frozen=True)
    class Config:
        exporter: str = "auto"
        """auto (dynamo, legacy fallback when fusion fails) | dynamo | legacy."""
        opset: int = 17
        parity_atol: float = 1e-3
        parity_rtol: float = 1e-3

        def __post_init__(self) -> None:
            if self.exporter not in ("auto", "dynamo", "legacy"):
                raise ValueError(f"exporter: {self.exporter!r} is not auto, dynamo or legacy")

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        import torch

        meta = artifact.meta
        names: list[str] = list(meta["input_names"])
        feeds = self._example(artifact, ctx)
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)
        program = bool(meta.get("exported_program"))
        out_dir = ctx.scratch(self.name)
        attempts: list[dict[str, Any]] = []
        order = self._order(artifact, program)
        path: Path | None = None
        used = None
        for exporter in order:
            candidate = out_dir / f"{exporter}.onnx"
            try:
                self._export(artifact, exporter, tensors, names, feeds, candidate)
            except Exception as exc:
                attempts.append({"exporter": exporter, "error": f"{type(exc).__name__}: {exc}"})
                continue
            attempt: dict[str, Any] = {"exporter": exporter}
            if artifact.family == "transformer" and meta.get("num_heads"):
                stats = self._fusion_stats(candidate, meta)
                attempt["fused_operators"] = stats
                fused = any(stats.get(op) for op in ATTENTION_OPS)
                attempt["attention_fused"] = fused
                attempts.append(attempt)
                if not fused and exporter != order[-1]:
                    continue  # try the next exporter: this graph defeats ORT's fusions
            else:
                attempts.append(attempt)
            path, used = candidate, exporter
            break
        if path is None:
            raise RuntimeError(f"every exporter failed: {attempts}")
        final = out_dir / "model.onnx"
        save_model(load_model(path), final)
        parity = self._parity(artifact, final, feeds, names)
        report = {"exporter": used, "attempts": attempts, "parity_max_abs_error": parity}
        output_name = meta.get("output_name", "output")
        new = Artifact(
            "onnx",
            artifact.family,
            onnx_path=final,
            meta={**meta, "exporter": used, "output_names": [output_name]},
        )
        new.meta.pop("example_inputs", None)
        return PassResult(new, True, report)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        check_loads(result.artifact.onnx_path)

    # -- helpers -------------------------------------------------------------------------
    def _order(self, artifact: Artifact, program: bool) -> list[str]:
        if program:
            return ["dynamo"]
        if self.config.exporter != "auto":
            return [self.config.exporter]
        return ["dynamo", "legacy"]

    def _example(self, artifact: Artifact, ctx: PassContext) -> dict[str, np.ndarray]:
        if "example_inputs" in artifact.meta:
            return dict(artifact.meta["example_inputs"])
        from optimizers.loaders import transformer_example

        batch = max(2, min(ctx.batch_size, 4))
        seq = max(8, min(ctx.seq_len, 32))
        return transformer_example(artifact.meta, batch, seq)

    def _export(
        self,
        artifact: Artifact,
        exporter: str,
        tensors: tuple,
        names: list[str],
        feeds: dict[str, np.ndarray],
        path: Path,
    ) -> None:
        import torch

        model = artifact.torch_model
        output_name = "output"
        if isinstance(model, torch.export.ExportedProgram):
            module = model
        else:
            output_name = first_output_name(
                model, {n: torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names}
            )
            module = _Wrapper(model, names)
        artifact.meta["output_name"] = output_name
        dynamic_axes = dict(artifact.meta.get("dynamic_axes") or {})
        if dynamic_axes:
            dynamic_axes[output_name] = {0: "batch", 1: "sequence"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs: dict[str, Any] = {
                "input_names": names,
                "output_names": [output_name],
                "opset_version": self.config.opset,
            }
            if isinstance(module, torch.export.ExportedProgram):
                onnx_program = torch.onnx.export(module, tensors, dynamo=True, **kwargs)
                onnx_program.save(str(path))
                return
            if exporter == "legacy":
                torch.onnx.export(
                    module,
                    tensors,
                    str(path),
                    dynamo=False,
                    dynamic_axes=dynamic_axes or None,
                    do_constant_folding=True,
                    **kwargs,
                )
            else:
                shapes = None
                if dynamic_axes:
                    dim = torch.export.Dim.DYNAMIC
                    # the wrapper takes ``*args``: its dynamic shapes nest under "args"
                    shapes = {
                        "args": tuple(
                            dict.fromkeys(dynamic_axes.get(name, {}), dim) or None for name in names
                        )
                    }
                onnx_program = torch.onnx.export(
                    module,
                    tensors,
                    dynamo=True,
                    dynamic_shapes=shapes,
                    external_data=False,
                    **kwargs,
                )
                onnx_program.save(str(path))

    def _fusion_stats(self, path: Path, meta: dict[str, Any]) -> dict[str, int]:
        from optimizers.passes.graph import bert_fusion, fused_statistics

        try:
            return fused_statistics(bert_fusion(path, meta))
        except Exception:
            return {}

    def _parity(
        self, artifact: Artifact, path: Path, feeds: dict[str, np.ndarray], names: list[str]
    ) -> float:
        import torch

        model = artifact.torch_model
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]
        with torch.inference_mode():
            if isinstance(model, torch.export.ExportedProgram):
                expected = model.module()(*tensors)
            else:
                expected = _Wrapper(model, names)(*tensors)
        if not isinstance(expected, torch.Tensor):
            expected = expected[0]
        expected_np = expected.detach().float().numpy()
        session = make_session(path, "cpu")
        got = session.run(None, {n: feeds[n] for n in names})[0]
        if got.shape != expected_np.shape:
            raise RuntimeError(
                f"parity: ONNX output shape {got.shape} != torch {expected_np.shape}"
            )
        error = float(np.max(np.abs(got.astype(np.float64) - expected_np))) if got.size else 0.0
        limit = self.config.parity_atol + self.config.parity_rtol * float(
            np.max(np.abs(expected_np)) if expected_np.size else 0.0
        )
        if not error <= limit:
            raise RuntimeError(f"parity: max abs error {error:.3g} exceeds {limit:.3g}")
        return error
