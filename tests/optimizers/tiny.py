"""Tiny real models for optimizer tests: a random-init BERT checkpoint, ONNX CNN and MLP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WORDS = [
    "the",
    "a",
    "is",
    "of",
    "to",
    "and",
    "in",
    "it",
    "for",
    "that",
    "be",
    "an",
    "this",
    "are",
    "with",
    "as",
    "on",
    "by",
    "or",
    "not",
    "can",
    "from",
    "value",
    "function",
    "object",
    "module",
    "python",
    "class",
    "return",
    "list",
    "string",
    "type",
    "data",
    "file",
    "name",
]


def tiny_bert_checkpoint(folder: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """A random-init ``BertModel`` (hidden 64, 4 heads) saved as safetensors + a tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    BertModel(config).eval().save_pretrained(folder, safe_serialization=True)
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def tiny_cnn(path: Path, *, classes: int = 5, seed: int = 0) -> Path:
    """Conv3x3 -> Relu -> Conv3x3 -> Relu -> GlobalAvgPool -> Flatten -> Gemm, input
    ``[N, 3, 16, 16]``, output logits ``[N, classes]``."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    fc = (rng.standard_normal((classes, 16)) * 0.5).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.full(16, 0.1, np.float32), "b2"),
        numpy_helper.from_array(fc, "fc"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fcb"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    return _save(graph, path)


def low_rank_matrix(rows: int, cols: int, rank: int, seed: int = 0) -> np.ndarray:
    """A ``rows x cols`` matrix of exact rank ``rank`` plus tiny noise."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(rank)
    return (base + 1e-4 * rng.standard_normal((rows, cols))).astype(np.float32)


def tiny_mlp(path: Path, *, width: int = 128, rank: int = 8, seed: int = 0) -> Path:
    """``x[N, width] -> MatMul(W1 low rank) -> Relu -> Gemm(W2 low rank, transB) -> y[N, 64]``."""
    rng = np.random.default_rng(seed)
    w1 = low_rank_matrix(width, width, rank, seed)
    w2 = low_rank_matrix(64, width, rank, seed + 1)  # [64, width], used transposed
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(rng.standard_normal(width).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.zeros(64, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="gemm2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        inits,
    )
    return _save(graph, path)
