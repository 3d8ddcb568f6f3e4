"""ONNX export of the encoder wrappers (legacy TorchScript exporter: ORT fuses its output)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from optimizers.transformer.encoder import PooledEncoder, SlimEncoder
from optimizers.transformer.packing import PackedEncoder
from optimizers.transformer.token_prune import TokenPrunedEncoder

INPUT_NAMES = ["input_ids", "attention_mask"]
OPSET = 17


def output_names(module: nn.Module) -> list[str]:
    """Graph output names of a wrapper."""
    if isinstance(module, TokenPrunedEncoder):
        return ["embedding", "seq_lens"]
    if isinstance(module, PooledEncoder | PackedEncoder):
        return ["last_hidden_state", "embedding"]
    raise TypeError(f"cannot export {type(module).__name__}; wrap the encoder first")


def export_onnx(module: nn.Module, path: Path, seq_len: int = 16, batch: int = 2) -> Path:
    """Export ``module`` with dynamic batch and sequence axes; returns ``path``."""
    if isinstance(module, SlimEncoder):
        module = PooledEncoder(module)
    module = module.eval()
    names = output_names(module)
    ids = torch.ones(batch, seq_len, dtype=torch.long)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[-1, seq_len // 2:] = 0
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes.update({"embedding": {0: "batch"}})
    if "last_hidden_state" in names:
        axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (ids, mask), str(path), dynamo=False, input_names=INPUT_NAMES,
            output_names=names, dynamic_axes=axes, opset_version=OPSET,
            do_constant_folding=True,
        )
    return path


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
