"""ONNX export of the encoder wrappers (legacy TorchScript exporter: ORT fuses its output)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from optimizers.transformer.encoder import PooledEncoder, SlimEncoder
from optimizers.transformer.packing import PackedEncoder
from optimizers.transformer.token_prune import HiddenStateOnly, TokenPrunedEncoder

INPUT_NAMES = ["input_ids", "attention_mask"]
OPSET = 17


def output_names(module: nn.Module) -> list[str]:
    """Graph output names of a wrapper."""
    if isinstance(module, TokenPrunedEncoder):
        return ["last_hidden_state", "embedding", "seq_lens"]
    if isinstance(module, HiddenStateOnly):
        return ["last_hidden_state"]
    if isinstance(module, PooledEncoder | PackedEncoder):
        return ["last_hidden_state", "embedding"]
    raise TypeError(f"cannot export {type(module).__name__}; wrap the encoder first")


def export_onnx(
    module: nn.Module,
    path: Path,
    seq_len: int = 16,
    batch: int = 2,
    input_names: list[str] | None = None,
    first_output: str | None = None,
) -> Path:
    """Export ``module`` with dynamic batch and sequence axes; returns ``path``.

    ``input_names`` may add ``token_type_ids`` to the default two inputs; ``first_output``
    renames the first output (to match the original graph's output name).
    """
    if isinstance(module, SlimEncoder):
        module = PooledEncoder(module)
    module = module.eval()
    names = output_names(module)
    if first_output:
        names = [first_output, *names[1:]]
    inputs = [n for n in (input_names or INPUT_NAMES) if n in (*INPUT_NAMES, "token_type_ids")]
    ids = torch.ones(batch, seq_len, dtype=torch.long)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[-1, seq_len // 2 :] = 0
    args = [ids, mask] + ([torch.zeros_like(ids)] if "token_type_ids" in inputs else [])
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if len(args) == 3 else [])
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    if "embedding" in names:
        axes["embedding"] = {0: "batch"}
    if names[0] != "embedding":
        axes[names[0]] = {0: "batch", 1: "sequence"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(args),
            str(path),
            dynamo=False,
            input_names=inputs,
            output_names=names,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    _expand_placeholders(path)
    return path


def _expand_placeholders(path: Path) -> None:
    """Write the ONNX ``Loop`` of packed per-sequence attention in place of its placeholders."""
    import onnx

    from optimizers.transformer.varlen_attention import DOMAIN, expand_varlen_attention

    model = onnx.load(str(path))
    if any(o.domain == DOMAIN for o in model.opset_import) and expand_varlen_attention(model):
        onnx.save(model, str(path))


def onnx_initializer_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Initializer name -> shape of an ONNX file (for checking pruned matrices)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {init.name: tuple(init.dims) for init in model.graph.initializer}


def ort_session(path: Path, threads: int = 2):
    """A CPU InferenceSession with all graph optimizations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_session(session, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``session`` on a batch; returns outputs by name."""
    feeds = {i.name: batch[i.name] for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
