"""Winograd F(2x2, 3x3) convolution as an ONNX graph rewrite (Lavin & Gray, CVPR 2016).

A 3x3, stride-1, dilation-1, groups-1 convolution becomes: pad the input so every output is
covered by 2x2 tiles, cut the overlapping 4x4 input tiles out with strided slices, transform
them (``V = Bᵀ d B``, additions only), multiply with the offline-transformed weights
(``U = G g Gᵀ``, constant initializers) as 16 batched matrix products ``[16,K,C] x [16,C,P]``
(16 multiplies per 2x2 output tile instead of 36), transform back (``Y = Aᵀ m A``), reassemble
the tiles, crop, add the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizers.cnn import graph

# F(2x2, 3x3) transforms for correlation (the convolution CNNs compute).
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


def transform_weights(weight: np.ndarray) -> np.ndarray:
    """``U = G g Gᵀ`` for every (out, in) filter: ``[K,C,3,3] -> [16,K,C]`` (float32)."""
    u = np.einsum("ai,kcij,bj->abkc", G, weight.astype(np.float64), G)
    return u.reshape(16, weight.shape[0], weight.shape[1]).astype(np.float32)


def winograd_conv_numpy(x: np.ndarray, weight: np.ndarray, pads: tuple[int, ...]) -> np.ndarray:
    """Reference F(2x2,3x3) in numpy (float64); ``pads`` = (top, left, bottom, right)."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    top, left, bottom, right = pads
    ho, wo = h + top + bottom - 2, w + left + right - 2
    th, tw = -(-ho // 2), -(-wo // 2)
    xp = np.zeros((n, c, 2 * th + 2, 2 * tw + 2))
    xp[:, :, top : top + h, left : left + w] = x
    tiles = np.stack(
        [[xp[:, :, i : i + 2 * th : 2, j : j + 2 * tw : 2] for j in range(4)] for i in range(4)]
    )  # [4,4,N,C,Th,Tw]
    v = np.einsum("ai,bj,ijncpq->abncpq", BT, BT, tiles).reshape(16, n, c, th * tw)
    u = np.einsum("ai,kcij,bj->abkc", G, weight.astype(np.float64), G).reshape(16, k, c)
    m = np.einsum("ukc,uncp->unkp", u, v).reshape(4, 4, n, k, th, tw)
    y = np.einsum("ra,sb,abnkpq->nkprqs", AT, AT, m).reshape(n, k, 2 * th, 2 * tw)
    return y[:, :, :ho, :wo]


@dataclass(frozen=True)
class ConvInfo:
    """A convolution the rewrite can handle, with its static geometry."""

    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    in_shape: tuple[int, int, int, int]  # N, C, H, W (N as inferred)

    @property
    def out_hw(self) -> tuple[int, int]:
        _, _, h, w = self.in_shape
        top, left, bottom, right = self.pads
        return h + top + bottom - 2, w + left + right - 2

    def describe(self) -> dict:
        _, c, h, w = self.in_shape
        return {
            "in_channels": c,
            "out_channels": int(self.weight.shape[0]),
            "height": h,
            "width": w,
            "pads": list(self.pads),
        }


def _pads_for(node: onnx.NodeProto) -> tuple[int, int, int, int] | str:
    auto_pad = graph.attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return (1, 1, 1, 1)
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    pads = list(graph.attr(node, "pads", [0, 0, 0, 0]))
    if len(pads) != 4:
        return f"pads {pads} are not 2-D"
    return (pads[0], pads[1], pads[2], pads[3])


def check_conv(
    model: onnx.ModelProto, node: onnx.NodeProto, shapes: dict[str, tuple[int, ...] | None]
) -> ConvInfo | str:
    """``ConvInfo`` when ``node`` can be rewritten, else the reason it cannot."""
    if node.op_type != "Conv":
        return f"{node.op_type} is not a Conv"
    weight = graph.array(model, node.input[1])
    if weight is None:
        return "weights are not a constant initializer"
    if weight.ndim != 4:
        return f"{weight.ndim - 2}-D convolution (only 2-D is supported)"
    if weight.shape[2:] != (3, 3):
        return f"kernel {weight.shape[2]}x{weight.shape[3]} (needs 3x3)"
    group = graph.attr(node, "group", 1)
    if group != 1:
        return f"groups={group} (needs 1)"
    strides = list(graph.attr(node, "strides", [1, 1]))
    if strides != [1, 1]:
        return f"stride {strides} (needs 1)"
    dilations = list(graph.attr(node, "dilations", [1, 1]))
    if dilations != [1, 1]:
        return f"dilation {dilations} (needs 1)"
    if weight.dtype != np.float32:
        return f"weights are {weight.dtype} (needs float32)"
    pads = _pads_for(node)
    if isinstance(pads, str):
        return pads
    if max(pads) > 2:
        return f"padding {list(pads)} larger than the kernel overlap"
    in_shape = shapes.get(node.input[0])
    if in_shape is None or len(in_shape) != 4:
        return "input spatial shape unknown (needs static H and W)"
    bias = graph.array(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and bias is None:
        return "bias is not a constant initializer"
    info = ConvInfo(node, weight, bias, pads, (in_shape[0], in_shape[1], in_shape[2], in_shape[3]))
    if min(info.out_hw) < 1:
        return "output is empty"
    return info


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def winograd_subgraph(
    info: ConvInfo, prefix: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers computing ``info.node``'s output with F(2x2,3x3).

    The input is transposed once to ``[C,N,H,W]`` (with a leading axis for stacking) so the
    16 transformed tiles stack into ``[16, C, N*P]`` without another transpose.
    """
    x_name, y_name = info.node.input[0], info.node.output[0]
    _, c, h, w = info.in_shape
    k = int(info.weight.shape[0])
    top, left, bottom, right = info.pads
    ho, wo = info.out_hw
    th, tw = -(-ho // 2), -(-wo // 2)
    extra_b, extra_r = 2 * th + 2 - (h + top + bottom), 2 * tw + 2 - (w + left + right)

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def t(name: str) -> str:
        return f"{prefix}/{name}"

    def const(name: str, value: np.ndarray) -> str:
        inits.append(_const(t(name), value))
        return t(name)

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [t(out)], name=t(out), **attrs))
        return t(out)

    xt = node("Transpose", [x_name], "x_cnhw", perm=[1, 0, 2, 3])
    xt = node("Unsqueeze", [xt, const("axis0", np.array([0], np.int64))], "x_1cnhw")
    pads = np.array([0, 0, 0, top, left, 0, 0, 0, bottom + extra_b, right + extra_r], np.int64)
    if pads.any():
        xt = node("Pad", [xt, const("pads", pads)], "x_padded")

    def strided(src: str, start: int, count: int, axis: int, out: str) -> str:
        return node(
            "Slice",
            [
                src,
                const(f"{out}_s", np.array([start], np.int64)),
                const(f"{out}_e", np.array([start + 2 * count - 1], np.int64)),
                const(f"{out}_a", np.array([axis], np.int64)),
                const(f"{out}_p", np.array([2], np.int64)),
            ],
            out,
        )

    def bt_combine(parts: list[str], tag: str) -> list[str]:
        """Rows of Bᵀ: d0-d2, d1+d2, d2-d1, d1-d3."""
        p0, p1, p2, p3 = parts
        return [
            node("Sub", [p0, p2], f"{tag}0"),
            node("Add", [p1, p2], f"{tag}1"),
            node("Sub", [p2, p1], f"{tag}2"),
            node("Sub", [p1, p3], f"{tag}3"),
        ]

    rows = [strided(xt, i, th, 3, f"row{i}") for i in range(4)]
    row_t = bt_combine(rows, "rowt")
    tiles: list[str] = []
    for a, row in enumerate(row_t):
        cols = [strided(row, j, tw, 4, f"r{a}c{j}") for j in range(4)]
        tiles.extend(bt_combine(cols, f"v{a}_"))
    v = node("Concat", tiles, "v", axis=0)  # [16, C, N, Th, Tw]
    v = node("Reshape", [v, const("v_shape", np.array([16, c, -1], np.int64))], "v_flat")
    u = const("u", transform_weights(info.weight))  # [16, K, C]
    m = node("MatMul", [u, v], "m")  # [16, K, N*Th*Tw]
    m = node("Reshape", [m, const("m_shape", np.array([16, -1], np.int64))], "m_flat")
    a_kron = const("at_kron", np.kron(AT, AT).astype(np.float32))  # [4, 16]
    y = node("MatMul", [a_kron, m], "y")  # [4, K*N*Th*Tw]
    y = node("Reshape", [y, const("y_shape", np.array([2, 2, k, -1, th, tw], np.int64))], "y6")
    y = node("Transpose", [y], "y_nkrs", perm=[3, 2, 4, 0, 5, 1])
    y = node(
        "Reshape", [y, const("y_out_shape", np.array([-1, k, 2 * th, 2 * tw], np.int64))], "y4"
    )
    if (2 * th, 2 * tw) != (ho, wo):
        y = node(
            "Slice",
            [
                y,
                const("crop_s", np.array([0, 0], np.int64)),
                const("crop_e", np.array([ho, wo], np.int64)),
                const("crop_a", np.array([2, 3], np.int64)),
            ],
            "cropped",
        )
    if info.bias is not None:
        bias = const("bias", info.bias.reshape(1, k, 1, 1).astype(np.float32))
        y = node("Add", [y, bias], "biased")
    nodes.append(helper.make_node("Identity", [y], [y_name], name=t("out")))
    return nodes, inits


def rewrite(model: onnx.ModelProto, infos: list[ConvInfo]) -> onnx.ModelProto:
    """A copy of ``model`` with every conv in ``infos`` replaced by its Winograd subgraph."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    chosen = {info.node.output[0]: info for info in infos}
    new_nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        info = chosen.get(node.output[0]) if node.op_type == "Conv" else None
        if info is None:
            new_nodes.append(node)
            continue
        prefix = graph.unique_name(out, f"{node.name or node.output[0]}/winograd")
        nodes, inits = winograd_subgraph(info, prefix)
        new_nodes.extend(nodes)
        out.graph.initializer.extend(inits)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    _drop_unused_initializers(out)
    return out


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used.update(o.name for o in model.graph.output)
    keep = [i for i in model.graph.initializer if i.name in used]
    graph_inputs = [
        v
        for v in model.graph.input
        if v.name in used or v.name not in {i.name for i in model.graph.initializer}
    ]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)


def single_conv_model(
    info: ConvInfo, batch: int, *, winograd: bool, opset: int = 17
) -> onnx.ModelProto:
    """A one-layer model: the original conv (or its Winograd form) on ``[batch, C, H, W]``."""
    _, c, h, w = info.in_shape
    k = int(info.weight.shape[0])
    ho, wo = info.out_hw
    top, left, bottom, right = info.pads
    inputs = ["x", "w"] + (["b"] if info.bias is not None else [])
    conv = helper.make_node(
        "Conv", inputs, ["y"], name="conv", kernel_shape=[3, 3], pads=[top, left, bottom, right]
    )
    inits = [_const("w", info.weight)]
    if info.bias is not None:
        inits.append(_const("b", info.bias))
    single = ConvInfo(conv, info.weight, info.bias, info.pads, (batch, c, h, w))
    if winograd:
        nodes, extra = winograd_subgraph(single, "wino")
        inits = extra
    else:
        nodes = [conv]
    g = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, k, ho, wo])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
