"""Exact per-sequence attention over packed tokens, exported as an ONNX ``Loop``.

``varlen_attention(qkv, bias, plan, heads)`` attends each sequence of a packed ``[T, 3D]``
Q|K|V batch over its own tokens only: no padding, no mask, so ONNX Runtime's CPU
``MultiHeadAttention`` takes its flash-attention path (it falls back to a slower unfused
kernel whenever a key mask is given) and the work is ``sum(len_i^2)``, not ``B * L_max^2``.

The PyTorch exporter cannot write a ``Loop`` from a traced function, so the function exports
as a placeholder node ``slimserve.VarlenAttention``; ``expand_varlen_attention`` then replaces
each placeholder by: Q|K|V as ``[3, T, D]``; a ``Loop`` over the sequences whose body is
Slice (the sequence's rows) -> Split -> ``com.microsoft.MultiHeadAttention`` -> Pad to
``L_max``; and one Gather of the stacked ``[B, L_max, D]`` output back into packed order.
Slice bounds and pads come from a ``SequencePlan`` computed once per forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
import torch
from onnx import TensorProto, helper

DOMAIN = "slimserve"
OP = "VarlenAttention"


@dataclass
class SequencePlan:
    """Where each sequence of a packed batch lives (shared by every layer)."""

    starts: torch.Tensor  # [B, 1] first packed row (an empty sequence borrows a real row)
    ends: torch.Tensor  # [B, 1] one past its last row (at least one row)
    pads: torch.Tensor  # [B, 6] ONNX Pad amounts taking [1, len, D] to [1, L_max, D]
    back: torch.Tensor  # [T] ``i * L_max + position`` of each packed token


def sequence_plan(mask: torch.Tensor, token_index: torch.Tensor) -> SequencePlan:
    """Plan for a 0/1 ``mask [B, S]`` whose real tokens sit at flat ``token_index [T]``.

    Sequence ``i`` owns packed rows ``offsets[i] .. offsets[i] + lengths[i] - 1`` whatever its
    padding side, since ``token_index`` scans the mask row by row.
    """
    lengths = mask.sum(1)
    offsets = torch.cumsum(lengths, 0) - lengths
    rows = torch.clamp(lengths, min=1)
    starts = torch.minimum(offsets, torch.full_like(offsets, token_index.shape[0] - 1))
    lmax = torch.clamp(lengths.max(), min=1)
    zero = torch.zeros_like(lengths)
    pads = torch.stack([zero, zero, zero, zero, lmax - rows, zero], dim=1)
    s = mask.shape[1]
    seq = torch.div(token_index, s, rounding_mode="floor")
    position = (torch.cumsum(mask, 1) - 1).reshape(-1)[token_index]
    return SequencePlan(
        starts.unsqueeze(1), (starts + rows).unsqueeze(1), pads, seq * lmax + position
    )


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, starts, ends, pads, back, heads: int):
        width = qkv.shape[1] // 3
        dh = width // heads
        qkv = qkv + bias
        stacked = []
        for start, end, pad in zip(
            starts[:, 0].tolist(), ends[:, 0].tolist(), pads[:, 4].tolist(), strict=True
        ):
            q, k, v = (
                x.reshape(end - start, heads, dh).transpose(0, 1)
                for x in torch.split(qkv[start:end], width, dim=1)
            )
            scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(dh)
            out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(0, 1)
            stacked.append(torch.nn.functional.pad(out.reshape(end - start, width), (0, 0, 0, pad)))
        return torch.cat(stacked)[back]

    @staticmethod
    def symbolic(g, qkv, bias, starts, ends, pads, back, heads: int):
        return g.op(f"{DOMAIN}::{OP}", qkv, bias, starts, ends, pads, back, heads_i=heads)


def varlen_attention(
    qkv: torch.Tensor, bias: torch.Tensor, plan: SequencePlan, heads: int
) -> torch.Tensor:
    """Context ``[T, D]`` of the packed projections ``qkv [T, 3D]`` (Q | K | V; ``bias [3D]``
    added), each sequence attending over its own rows."""
    return _VarlenAttention.apply(qkv, bias, plan.starts, plan.ends, plan.pads, plan.back, heads)


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    tensor = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
    return helper.make_node("Constant", [], [name], value=tensor)


def _loop_body(
    p: str, qkv: str, bias: str, starts: str, ends: str, pads: str, heads: int
) -> onnx.GraphProto:
    """Body for sequence ``i``: its rows of ``qkv [3, T, D]`` -> attention -> ``[1, L_max, D]``."""
    n = lambda s: f"{p}_{s}"  # noqa: E731
    nodes = [
        _const(n("axis"), [1]),
        helper.make_node("Gather", [starts, n("i")], [n("start")]),
        helper.make_node("Gather", [ends, n("i")], [n("end")]),
        helper.make_node("Gather", [pads, n("i")], [n("pads")]),
        helper.make_node("Slice", [qkv, n("start"), n("end"), n("axis")], [n("rows")]),
        helper.make_node("Split", [n("rows")], [n("q"), n("k"), n("v")], axis=0),
        helper.make_node(
            "MultiHeadAttention",
            [n("q"), n("k"), n("v"), bias],
            [n("ctx")],
            domain="com.microsoft",
            num_heads=heads,
        ),
        helper.make_node("Pad", [n("ctx"), n("pads")], [n("padded")]),
        helper.make_node("Identity", [n("cond_in")], [n("cond_out")]),
    ]
    return helper.make_graph(
        nodes,
        f"{p}_body",
        [
            helper.make_tensor_value_info(n("i"), TensorProto.INT64, []),
            helper.make_tensor_value_info(n("cond_in"), TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info(n("cond_out"), TensorProto.BOOL, []),
            helper.make_tensor_value_info(n("padded"), TensorProto.FLOAT, None),
        ],
    )


def _expand(node: onnx.NodeProto, index: int, width: int) -> list[onnx.NodeProto]:
    qkv2d, bias, starts, ends, pads, back = node.input
    heads = next(a.i for a in node.attribute if a.name == "heads")
    p = f"varlen{index}"
    n = lambda s: f"{p}_{s}"  # noqa: E731
    body = _loop_body(f"{p}_body", n("qkv"), bias, starts, ends, pads, heads)
    return [
        _const(n("shape3"), [-1, 3, width]),
        helper.make_node("Reshape", [qkv2d, n("shape3")], [n("tqkv")]),
        helper.make_node("Transpose", [n("tqkv")], [n("qkv")], perm=[1, 0, 2]),  # [3, T, D]
        _const(n("zero"), [0]),
        helper.make_node("Shape", [starts], [n("count1")], end=1),
        helper.make_node("Squeeze", [n("count1"), n("zero")], [n("count")]),
        helper.make_node(
            "Constant",
            [],
            [n("cond")],
            value=helper.make_tensor(n("cond_t"), TensorProto.BOOL, [], [True]),
        ),
        helper.make_node("Loop", [n("count"), n("cond")], [n("stacked")], body=body),
        _const(n("flat_shape"), [-1, width]),  # [B, 1, L_max, D] -> [B * L_max, D]
        helper.make_node("Reshape", [n("stacked"), n("flat_shape")], [n("flat")]),
        helper.make_node("Gather", [n("flat"), back], list(node.output), axis=0),
    ]


def expand_varlen_attention(model: onnx.ModelProto) -> int:
    """Replace every ``slimserve.VarlenAttention`` node of ``model`` in place; returns how many."""
    graph = model.graph
    # the bias [3D] is an initializer, a Constant, or an Identity of one (the exporter
    # deduplicates equal initializers, e.g. the all-zero biases of a fresh model)
    sizes = {i.name: list(i.dims) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value":
                    sizes[node.output[0]] = list(attribute.t.dims)
        elif node.op_type == "Identity" and node.input[0] in sizes:
            sizes[node.output[0]] = sizes[node.input[0]]
    nodes, count = [], 0
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type == OP:
            bias = sizes.get(node.input[1])
            if not bias:
                raise ValueError(
                    f"{OP} node {node.name!r}: its bias {node.input[1]!r} is not a constant"
                )
            nodes += _expand(node, count, int(bias[0]) // 3)
            count += 1
        else:
            nodes.append(node)
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        imports = [o for o in model.opset_import if o.domain != DOMAIN]
        if not any(o.domain == "com.microsoft" for o in imports):
            imports.append(helper.make_opsetid("com.microsoft", 1))
        del model.opset_import[:]
        model.opset_import.extend(imports)
    return count
