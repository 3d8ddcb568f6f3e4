"""Run a convolutional ONNX graph in torch, so gradients reach every intermediate tensor.

Supports the operators exported CNN classifiers use (Conv, BatchNormalization, pooling,
activations, Gemm/MatMul, elementwise arithmetic, Flatten/Reshape and the shape arithmetic
around them). Anything else raises ``UnsupportedGraph`` naming the operator.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from optimizers.cnn import graph


class UnsupportedGraph(Exception):
    """The graph uses an operator this interpreter does not implement."""


def _pads_2d(pads: list[int]) -> tuple[int, int, int, int]:
    top, left, bottom, right = pads
    return (left, right, top, bottom)


def _conv(node, x, w, b=None):
    pads = list(graph.attr(node, "pads", [0, 0, 0, 0]))
    auto_pad = graph.attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise UnsupportedGraph(f"Conv auto_pad={auto_pad}")
    if len(pads) == 4 and pads[:2] != pads[2:]:
        x = F.pad(x, _pads_2d(pads))
        pads = [0, 0, 0, 0]
    return F.conv2d(
        x,
        w,
        b,
        stride=tuple(graph.attr(node, "strides", [1, 1])),
        padding=tuple(pads[:2]) if pads else 0,
        dilation=tuple(graph.attr(node, "dilations", [1, 1])),
        groups=graph.attr(node, "group", 1),
    )


def _pool(node, x, kind: str):
    kernel = tuple(graph.attr(node, "kernel_shape"))
    strides = tuple(graph.attr(node, "strides", [1] * len(kernel)))
    pads = list(graph.attr(node, "pads", [0] * 2 * len(kernel)))
    if pads[:2] != pads[2:]:
        x = F.pad(x, _pads_2d(pads), value=-float("inf") if kind == "max" else 0.0)
        pads = [0, 0, 0, 0]
    ceil = bool(graph.attr(node, "ceil_mode", 0))
    if kind == "max":
        return F.max_pool2d(x, kernel, strides, tuple(pads[:2]), ceil_mode=ceil)
    include = bool(graph.attr(node, "count_include_pad", 0))
    return F.avg_pool2d(
        x, kernel, strides, tuple(pads[:2]), ceil_mode=ceil, count_include_pad=include
    )


def _gemm(node, a, b, c=None):
    if graph.attr(node, "transA", 0):
        a = a.t()
    if graph.attr(node, "transB", 0):
        b = b.t()
    y = graph.attr(node, "alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + graph.attr(node, "beta", 1.0) * c
    return y


def _reshape(x, shape):
    dims = [int(d) for d in shape.tolist()]
    dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _clip(x, lo=None, hi=None):
    return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))


def _bn(node, x, scale, bias, mean, var):
    eps = graph.attr(node, "epsilon", 1e-5)
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)


def _axes(node, inputs, index=1):
    axes = graph.attr(node, "axes")
    if axes is None and len(inputs) > index and inputs[index] is not None:
        axes = inputs[index].tolist()
    return axes


def _unsqueeze(node, x, *rest):
    for axis in sorted(_axes(node, [x, *rest])):
        x = x.unsqueeze(axis)
    return x


def _squeeze(node, x, *rest):
    axes = _axes(node, [x, *rest])
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _gather(node, x, idx):
    axis = graph.attr(node, "axis", 0)
    if idx.dim() == 0:
        return x.select(axis, int(idx))
    return torch.index_select(x, axis, idx.reshape(-1).long()).reshape(
        *x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]
    )


OPS = {
    "Conv": _conv,
    "Relu": lambda n, x: F.relu(x),
    "LeakyRelu": lambda n, x: F.leaky_relu(x, graph.attr(n, "alpha", 0.01)),
    "Sigmoid": lambda n, x: torch.sigmoid(x),
    "Clip": lambda n, x, lo=None, hi=None: _clip(
        x, graph.attr(n, "min") if lo is None else lo, graph.attr(n, "max") if hi is None else hi
    ),
    "MaxPool": lambda n, x: _pool(n, x, "max"),
    "AveragePool": lambda n, x: _pool(n, x, "avg"),
    "GlobalAveragePool": lambda n, x: x.mean(dim=(2, 3), keepdim=True),
    "Flatten": lambda n, x: x.reshape(int(np.prod(x.shape[: graph.attr(n, "axis", 1)])), -1),
    "Reshape": lambda n, x, s: _reshape(x, s),
    "Gemm": _gemm,
    "MatMul": lambda n, a, b: a @ b,
    "Add": lambda n, a, b: a + b,
    "Sub": lambda n, a, b: a - b,
    "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: a / b,
    "Identity": lambda n, x: x,
    "Dropout": lambda n, x, *rest: x,
    "BatchNormalization": _bn,
    "Softmax": lambda n, x: torch.softmax(x, dim=graph.attr(n, "axis", -1)),
    "Shape": lambda n, x: torch.tensor(x.shape, dtype=torch.int64),
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": lambda n, *xs: torch.cat(xs, dim=graph.attr(n, "axis")),
    "Transpose": lambda n, x: x.permute(*graph.attr(n, "perm", list(range(x.dim()))[::-1])),
}


class TorchGraph:
    """An ONNX CNN evaluated with torch ops (float32, eval semantics)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        unsupported = sorted({n.op_type for n in model.graph.node} - set(OPS) - {"Constant"})
        if unsupported:
            raise UnsupportedGraph(f"operators not supported: {', '.join(unsupported)}")
        self.nodes = list(model.graph.node)
        self.constants: dict[str, torch.Tensor] = {
            init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
            for init in model.graph.initializer
        }
        for node in self.nodes:
            if node.op_type == "Constant":
                value = graph.attr(node, "value")
                self.constants[node.output[0]] = torch.from_numpy(
                    numpy_helper.to_array(value).copy()
                )
        self.inputs = graph.input_names(model)
        self.outputs = [o.name for o in model.graph.output]

    def run(
        self, feeds: dict[str, np.ndarray | torch.Tensor], retain: Iterable[str] = ()
    ) -> dict[str, torch.Tensor]:
        """Every tensor by name; tensors in ``retain`` keep their gradient after backward."""
        retain = set(retain)
        values: dict[str, torch.Tensor] = dict(self.constants)
        for name, value in feeds.items():
            values[name] = torch.as_tensor(value)
        for node in self.nodes:
            if node.op_type == "Constant":
                continue
            args = [values[name] if name else None for name in node.input]
            out = OPS[node.op_type](node, *args)
            values[node.output[0]] = out
            if node.output[0] in retain and out.requires_grad:
                out.retain_grad()
        return values
