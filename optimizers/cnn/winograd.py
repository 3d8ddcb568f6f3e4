"""Winograd F(2x2, 3x3) / F(4x4, 3x3) convolution as an ONNX graph rewrite (Lavin & Gray 2016).

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

# Transforms for correlation (the convolution CNNs compute), Lavin & Gray 2016.
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)
# F(4x4, 3x3): interpolation points 0, +-1, +-2, infinity.
BT4 = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=np.float64,
)
G4 = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=np.float64,
)
AT4 = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    dtype=np.float64,
)
TRANSFORMS = {2: (BT, G, AT), 4: (BT4, G4, AT4)}


def transform_weights(weight: np.ndarray, m: int = 2) -> np.ndarray:
    """``U = G g Gᵀ`` for every (out, in) filter: ``[K,C,3,3] -> [t*t, K, C]`` (float32).

    The leading index is ``b * t + a`` (column-transform index major), matching the order
    the graph produces the transformed input tiles in.
    """
    _, g, _ = TRANSFORMS[m]
    u = np.einsum("ai,kcij,bj->bakc", g, weight.astype(np.float64), g)
    t = m + 2
    return u.reshape(t * t, weight.shape[0], weight.shape[1]).astype(np.float32)


def winograd_conv_numpy(
    x: np.ndarray, weight: np.ndarray, pads: tuple[int, ...], m: int = 2
) -> np.ndarray:
    """Reference F(mxm,3x3) in numpy (float64); ``pads`` = (top, left, bottom, right)."""
    bt, g, at = TRANSFORMS[m]
    t = m + 2
    n, c, h, w = x.shape
    k = weight.shape[0]
    top, left, bottom, right = pads
    ho, wo = h + top + bottom - 2, w + left + right - 2
    th, tw = -(-ho // m), -(-wo // m)
    xp = np.zeros((n, c, m * th + 2, m * tw + 2))
    xp[:, :, top : top + h, left : left + w] = x
    tiles = np.stack(
        [[xp[:, :, i : i + m * th : m, j : j + m * tw : m] for j in range(t)] for i in range(t)]
    )  # [t,t,N,C,Th,Tw]
    v = np.einsum("ai,bj,ijncpq->abncpq", bt, bt, tiles).reshape(t * t, n, c, th * tw)
    u = np.einsum("ai,kcij,bj->abkc", g, weight.astype(np.float64), g).reshape(t * t, k, c)
    mm = np.einsum("ukc,uncp->unkp", u, v).reshape(t, t, n, k, th, tw)
    y = np.einsum("ra,sb,abnkpq->nkprqs", at, at, mm).reshape(n, k, m * th, m * tw)
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
    info: ConvInfo, prefix: str, m: int = 2
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers computing ``info.node``'s output with F(mxm, 3x3).

    The input is transposed once to ``[C,N,H,W]``; ``t = m+2`` strided row slices are
    stacked and transformed by one small MatMul with ``Bᵀ``, then ``t`` strided column
    slices likewise, giving the ``t*t`` transformed tiles as ``[t*t, C, N*P]``. The products
    with ``U`` are ``t*t`` batched MatMuls ``[t*t,K,C] x [t*t,C,N*P]``; ``Aᵀ`` is applied on
    both tile axes with two more small MatMuls, and one transpose reassembles ``[N,K,H,W]``.
    """
    bt, _, at = TRANSFORMS[m]
    t = m + 2
    x_name, y_name = info.node.input[0], info.node.output[0]
    _, c, h, w = info.in_shape
    k = int(info.weight.shape[0])
    top, left, bottom, right = info.pads
    ho, wo = info.out_hw
    th, tw = -(-ho // m), -(-wo // m)
    extra_b, extra_r = m * th + 2 - (h + top + bottom), m * tw + 2 - (w + left + right)

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def n_(name: str) -> str:
        return f"{prefix}/{name}"

    def const(name: str, value: np.ndarray) -> str:
        inits.append(_const(n_(name), value))
        return n_(name)

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [n_(out)], name=n_(out), **attrs))
        return n_(out)

    def i64(*values: int) -> np.ndarray:
        return np.array(values, np.int64)

    xt = node("Transpose", [x_name], "x_cnhw", perm=[1, 0, 2, 3])
    xt = node("Unsqueeze", [xt, const("axis0", i64(0))], "x_1cnhw")
    pads = i64(0, 0, 0, top, left, 0, 0, 0, bottom + extra_b, right + extra_r)
    if pads.any():
        xt = node("Pad", [xt, const("pads", pads)], "x_padded")
    bt_const = const("bt", bt.astype(np.float32))
    step = const("step", i64(m))

    def phases(src: str, axis: int, count: int, tag: str) -> str:
        """Stack the ``t`` strided phases of ``src`` along a new leading axis (it is size 1)."""
        axis_c = const(f"{tag}_axis", i64(axis))
        parts = [
            node(
                "Slice",
                [
                    src,
                    const(f"{tag}{i}_s", i64(i)),
                    const(f"{tag}{i}_e", i64(i + m * (count - 1) + 1)),
                    axis_c,
                    step,
                ],
                f"{tag}{i}",
            )
            for i in range(t)
        ]
        return node("Concat", parts, f"{tag}_stack", axis=0)

    rows = phases(xt, 3, th, "row")  # [t, C, N, Th, Wp]
    flat = node("Reshape", [rows, const("rows_shape", i64(t, -1))], "rows_flat")
    rows_t = node("MatMul", [bt_const, flat], "rows_bt")  # [t(a), C*N*Th*Wp]
    rows_t = node(
        "Reshape", [rows_t, const("rows_bt_shape", i64(t, c, -1, th, m * tw + 2))], "rows_bt5"
    )  # [t(a), C, N, Th, Wp]
    cols = phases(rows_t, 4, tw, "col")  # [t(b) * t(a), C, N, Th, Tw]
    flat = node("Reshape", [cols, const("cols_shape", i64(t, -1))], "cols_flat")
    v = node("MatMul", [bt_const, flat], "v")  # [t(b), t(a)*C*N*Th*Tw]
    v = node("Reshape", [v, const("v_shape", i64(t * t, c, -1))], "v_flat")  # [t*t, C, N*P]
    u = const("u", transform_weights(info.weight, m))  # [t*t, K, C]
    mm = node("MatMul", [u, v], "m")  # [t*t, K, N*P], index b*t + a
    at_const = const("at", at.astype(np.float32))
    mm = node("Reshape", [mm, const("m_shape", i64(t, -1))], "m_flat")
    y = node("MatMul", [at_const, mm], "y_b")  # [m(s), t(a)*K*N*P]
    y = node("Reshape", [y, const("y_b_shape", i64(m, t, -1))], "y_b3")
    y = node("MatMul", [at_const, y], "y_ab")  # [m(s), m(r), K*N*P]
    y = node("Reshape", [y, const("y_shape", i64(m, m, k, -1, th, tw))], "y6")
    y = node("Transpose", [y], "y_nkrs", perm=[3, 2, 4, 1, 5, 0])  # [N, K, Th, r, Tw, s]
    y = node("Reshape", [y, const("y_out_shape", i64(-1, k, m * th, m * tw))], "y4")
    if (m * th, m * tw) != (ho, wo):
        y = node(
            "Slice",
            [
                y,
                const("crop_s", i64(0, 0)),
                const("crop_e", i64(ho, wo)),
                const("crop_a", i64(2, 3)),
            ],
            "cropped",
        )
    if info.bias is not None:
        bias = const("bias", info.bias.reshape(1, k, 1, 1).astype(np.float32))
        y = node("Add", [y, bias], "biased")
    nodes.append(helper.make_node("Identity", [y], [y_name], name=n_("out")))
    return nodes, inits


def rewrite(
    model: onnx.ModelProto, infos: list[ConvInfo], tiles: dict[str, int] | int = 2
) -> onnx.ModelProto:
    """A copy of ``model`` with every conv in ``infos`` replaced by its Winograd subgraph.

    ``tiles``: output tile size ``m`` (2 or 4) for all convs, or per conv output name.
    """
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
        m = tiles if isinstance(tiles, int) else tiles.get(node.output[0], 2)
        nodes, inits = winograd_subgraph(info, prefix, m)
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
    info: ConvInfo, batch: int, *, winograd: bool, m: int = 2, opset: int = 17
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
        nodes, extra = winograd_subgraph(single, "wino", m)
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
