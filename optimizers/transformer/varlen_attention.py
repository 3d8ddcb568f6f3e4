"""Exact per-sequence attention over packed tokens, exported as an ONNX ``Loop``.

``varlen_attention(q, k, v, ...)`` attends each sequence of a packed ``[T, D]`` batch over its
own tokens only: no padding, no mask, so ONNX Runtime's CPU ``MultiHeadAttention`` takes its
flash-attention path (it falls back to a slower unfused kernel whenever a key mask is given)
and the work is ``sum(len_i^2)`` instead of ``B * L_max^2``.

The PyTorch exporter cannot write a ``Loop`` from a traced function, so the function exports
as a placeholder node ``slimserve.VarlenAttention``; ``expand_varlen_attention`` then replaces
each placeholder by a ``Loop`` over the sequences (Slice the sequence's rows of Q/K/V,
``com.microsoft.MultiHeadAttention``, Pad to ``L_max``) and one Gather of the loop's stacked
output back into packed order.
"""

from __future__ import annotations

import math

import onnx
import torch
from onnx import TensorProto, helper

DOMAIN = "slimserve"
OP = "VarlenAttention"


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, offsets, lengths, back, heads: int):
        width = qkv.shape[1] // 3
        q, k, v = torch.split(qkv, width, dim=1)
        dh = width // heads
        qb, kb, vb = torch.split(bias, width)
        out = torch.zeros_like(q)
        for start, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
            if n == 0:
                continue
            rows = slice(start, start + n)

            def split(x: torch.Tensor, rows: slice = rows, n: int = n) -> torch.Tensor:
                return x[rows].reshape(n, heads, dh).transpose(0, 1)

            scores = torch.matmul(split(q + qb), split(k + kb).transpose(1, 2)) / math.sqrt(dh)
            ctx_ = torch.matmul(torch.softmax(scores, dim=-1), split(v + vb))
            out[rows] = ctx_.transpose(0, 1).reshape(n, width)
        return out

    @staticmethod
    def symbolic(g, qkv, bias, offsets, lengths, back, heads: int):
        return g.op(f"{DOMAIN}::{OP}", qkv, bias, offsets, lengths, back, heads_i=heads)


def varlen_attention(
    qkv: torch.Tensor,
    bias: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    back: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """Context ``[T, D]`` of the packed projections ``qkv [T, 3D]`` (Q | K | V; ``bias [3D]``).

    Sequence ``i`` owns rows ``offsets[i] .. offsets[i] + lengths[i] - 1``; ``back [T]`` is
    ``i * L_max + position`` of each packed token (where the Loop's ``[B, L_max, D]`` output
    holds it).
    """
    return _VarlenAttention.apply(qkv, bias, offsets, lengths, back, heads)


def back_index(token_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``i * L_max + position`` of each packed token (``token_index`` = flat padded positions)."""
    s = mask.shape[1]
    lmax = torch.clamp(mask.sum(1).max(), min=1)
    seq = torch.div(token_index, s, rounding_mode="floor")
    position = (torch.cumsum(mask, 1) - 1).reshape(-1)[token_index]
    return seq * lmax + position


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    tensor = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
    return helper.make_node("Constant", [], [name], value=tensor)


def _loop_body(
    p: str,
    qkv: str,
    width: int,
    bias: str,
    offsets: str,
    lengths: str,
    lmax: str,
    last: str,
    heads: int,
) -> onnx.GraphProto:
    """Loop body for sequence ``i``: its rows of ``qkv [1, T, 3D]`` -> MultiHeadAttention ->
    ``[1, L_max, D]``."""
    n = lambda s: f"{p}_{s}"  # noqa: E731
    nodes = [
        _const(n("zero"), [0]),
        _const(n("one"), [1]),
        helper.make_node("Unsqueeze", [n("i"), n("zero")], [n("i1")]),
        helper.make_node("Gather", [offsets, n("i1")], [n("start0")]),
        helper.make_node("Gather", [lengths, n("i1")], [n("len0")]),
        # an empty sequence still attends over one row (its output is never gathered)
        helper.make_node("Min", [n("start0"), last], [n("start")]),
        helper.make_node("Max", [n("len0"), n("one")], [n("len")]),
        helper.make_node("Add", [n("start"), n("len")], [n("end")]),
    ]
    nodes += [_const(n("axes"), [1, 2])]
    for j, x in enumerate("qkv"):
        nodes += [
            _const(n(f"{x}_col0"), [j * width]),
            _const(n(f"{x}_col1"), [(j + 1) * width]),
            helper.make_node("Concat", [n("start"), n(f"{x}_col0")], [n(f"{x}_lo")], axis=0),
            helper.make_node("Concat", [n("end"), n(f"{x}_col1")], [n(f"{x}_hi")], axis=0),
            helper.make_node("Slice", [qkv, n(f"{x}_lo"), n(f"{x}_hi"), n("axes")], [n(x)]),
        ]
    nodes += [
        helper.make_node(
            "MultiHeadAttention",
            [n("q"), n("k"), n("v"), bias],
            [n("ctx")],
            domain="com.microsoft",
            num_heads=heads,
        ),
        helper.make_node("Sub", [lmax, n("len")], [n("short")]),
        _const(n("pads_lo"), [0, 0, 0, 0]),
        _const(n("pads_hi"), [0]),
        helper.make_node("Concat", [n("pads_lo"), n("short"), n("pads_hi")], [n("pads")], axis=0),
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
    qkv2d, bias, offsets, lengths, back = node.input
    heads = next(a.i for a in node.attribute if a.name == "heads")
    p = f"varlen{index}"
    body_prefix = f"{p}_body"
    n = lambda s: f"{p}_{s}"  # noqa: E731
    qkv = n("qkv3d")
    body = _loop_body(body_prefix, qkv, width, bias, offsets, lengths, n("lmax"), n("last"), heads)
    return [
        _const(n("one"), [1]),
        _const(n("zero"), [0]),
        _const(n("shape3d"), [1, -1, 3 * width]),
        helper.make_node("Reshape", [qkv2d, n("shape3d")], [qkv]),
        helper.make_node("ReduceMax", [lengths], [n("lmax0")], axes=[0], keepdims=1),
        helper.make_node("Max", [n("lmax0"), n("one")], [n("lmax")]),
        helper.make_node("Shape", [qkv2d], [n("qshape")], end=1),
        helper.make_node("Sub", [n("qshape"), n("one")], [n("last")]),
        helper.make_node("Shape", [lengths], [n("count1")]),
        helper.make_node("Squeeze", [n("count1"), n("zero")], [n("count")]),
        helper.make_node(
            "Constant",
            [],
            [n("cond")],
            value=helper.make_tensor(n("cond_t"), TensorProto.BOOL, [], [True]),
        ),
        helper.make_node("Loop", [n("count"), n("cond")], [n("stacked")], body=body),
        # stacked [B, 1, L_max, D] -> [B * L_max, D]
        _const(n("flat_shape"), [-1, width]),
        helper.make_node("Reshape", [n("stacked"), n("flat_shape")], [n("flat")]),
        helper.make_node("Gather", [n("flat"), back], list(node.output), axis=0),
    ]


def expand_varlen_attention(model: onnx.ModelProto) -> int:
    """Replace every ``slimserve.VarlenAttention`` node of ``model`` in place; returns how many."""
    graph = model.graph
    nodes, count = [], 0
    sizes = {i.name: i.dims for i in graph.initializer}
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type == OP:
            nodes += _expand(node, count, int(sizes[node.input[1]][0]) // 3)
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
