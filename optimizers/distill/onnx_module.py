"""A trainable PyTorch module that runs an ONNX graph node by node, so a student made by
slicing an ONNX model's weights can be trained and written back into the same graph.

Covers the operators of feed-forward CNNs and MLPs (Conv, pooling, Gemm/MatMul, BatchNorm,
activations, Flatten/Reshape ...); any other operator raises ``UnsupportedGraph``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F


class UnsupportedGraph(ValueError):
    """The graph uses something this interpreter cannot train."""


Op = Callable[[list[Any], dict[str, Any]], list[torch.Tensor]]


def _pads(attrs: dict[str, Any], spatial: int) -> tuple[list[int], list[int]]:
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise UnsupportedGraph("auto_pad SAME_* is not supported")
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    return pads[:spatial], pads[spatial:]


def _sym_or_pad(x: torch.Tensor, attrs: dict[str, Any], spatial: int, value: float = 0.0):
    begin, end = _pads(attrs, spatial)
    if begin == end:
        return x, begin
    flat = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * spatial


def _conv(xs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, w = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    spatial = w.dim() - 2
    x, padding = _sym_or_pad(x, a, spatial)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return [
        conv(
            x,
            w,
            bias,
            stride=a.get("strides", 1),
            padding=padding,
            dilation=a.get("dilations", 1),
            groups=a.get("group", 1),
        )
    ]


def _max_pool(xs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    kernel = a["kernel_shape"]
    x, padding = _sym_or_pad(xs[0], a, len(kernel), value=float("-inf"))
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    return [
        pool(
            x,
            kernel,
            stride=a.get("strides", kernel),
            padding=padding,
            dilation=a.get("dilations", 1),
            ceil_mode=bool(a.get("ceil_mode", 0)),
        )
    ]


def _avg_pool(xs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    kernel = a["kernel_shape"]
    begin, end = _pads(a, len(kernel))
    if begin != end:
        raise UnsupportedGraph("asymmetric AveragePool padding is not supported")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    return [
        pool(
            xs[0],
            kernel,
            stride=a.get("strides", kernel),
            padding=begin,
            ceil_mode=bool(a.get("ceil_mode", 0)),
            count_include_pad=bool(a.get("count_include_pad", 0)),
        )
    ]


def _gemm(xs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, w = xs[0], xs[1]
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    if len(xs) > 2 and xs[2] is not None:
        y = y + a.get("beta", 1.0) * xs[2]
    return [y]


def _reshape(xs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, shape = xs[0], [int(s) for s in xs[1].tolist()]
    shape = [x.shape[i] if s == 0 and not a.get("allowzero", 0) else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _batch_norm(xs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, scale, bias, mean, var = xs[:5]
    return [F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))]


def _clip(xs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    low = xs[1] if len(xs) > 1 and xs[1] is not None else a.get("min")
    high = xs[2] if len(xs) > 2 and xs[2] is not None else a.get("max")
    low = float(low) if low is not None else None
    high = float(high) if high is not None else None
    return [torch.clamp(xs[0], low, high)]


def _axes(xs: list[Any], a: dict[str, Any]) -> list[int]:
    return [int(v) for v in xs[1].tolist()] if len(xs) > 1 else list(a["axes"])


def _unsqueeze(xs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = xs[0]
    for axis in sorted(_axes(xs, a)):
        x = x.unsqueeze(axis)
    return [x]


OPS: dict[str, Op] = {
    "Conv": _conv,
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": lambda xs, a: [xs[0].mean(dim=tuple(range(2, xs[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda xs, a: [xs[0].amax(dim=tuple(range(2, xs[0].dim())), keepdim=True)],
    "Gemm": _gemm,
    "MatMul": lambda xs, a: [xs[0] @ xs[1]],
    "Add": lambda xs, a: [xs[0] + xs[1]],
    "Sub": lambda xs, a: [xs[0] - xs[1]],
    "Mul": lambda xs, a: [xs[0] * xs[1]],
    "Div": lambda xs, a: [xs[0] / xs[1]],
    "Relu": lambda xs, a: [F.relu(xs[0])],
    "LeakyRelu": lambda xs, a: [F.leaky_relu(xs[0], a.get("alpha", 0.01))],
    "Sigmoid": lambda xs, a: [torch.sigmoid(xs[0])],
    "Tanh": lambda xs, a: [torch.tanh(xs[0])],
    "HardSwish": lambda xs, a: [F.hardswish(xs[0])],
    "Clip": _clip,
    "BatchNormalization": _batch_norm,
    "Flatten": lambda xs, a: [xs[0].reshape(int(np.prod(xs[0].shape[: a.get("axis", 1)])), -1)],
    "Reshape": _reshape,
    "Softmax": lambda xs, a: [F.softmax(xs[0], dim=a.get("axis", -1))],
    "LogSoftmax": lambda xs, a: [F.log_softmax(xs[0], dim=a.get("axis", -1))],
    "Identity": lambda xs, a: [xs[0]],
    "Dropout": lambda xs, a: [xs[0]],
    "Concat": lambda xs, a: [torch.cat(xs, dim=a["axis"])],
    "Transpose": lambda xs, a: [xs[0].permute(*a["perm"])],
    "Unsqueeze": _unsqueeze,
    "Squeeze": lambda xs, a: [xs[0].squeeze(tuple(_axes(xs, a)))],
}

# Initializers at these input positions are statistics or shapes, never trained.
_FROZEN_INPUTS = {"BatchNormalization": {3, 4}, "Reshape": {1}, "Clip": {1, 2}}


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    attrs = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        attrs[attr.name] = value
    return attrs


class OnnxModule(nn.Module):
    """Runs ``model``'s graph with torch ops; its float weight initializers are parameters."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        self.model = model
        graph = model.graph
        for node in graph.node:
            if node.op_type not in OPS and node.op_type != "Constant":
                raise UnsupportedGraph(f"operator {node.op_type} (node {node.name!r})")
            if node.domain not in ("", "ai.onnx"):
                raise UnsupportedGraph(f"operator domain {node.domain!r} (node {node.name!r})")
        frozen = {
            name
            for node in graph.node
            for i, name in enumerate(node.input)
            if i in _FROZEN_INPUTS.get(node.op_type, set())
        }
        self.keys: dict[str, str] = {}
        self.weights = nn.ParameterDict()
        self.constants: dict[str, torch.Tensor] = {}
        for init in graph.initializer:
            array = numpy_helper.to_array(init)
            key = f"w{len(self.keys)}"
            self.keys[init.name] = key
            tensor = torch.from_numpy(np.array(array))
            if array.dtype == np.float32 and array.size > 1 and init.name not in frozen:
                self.weights[key] = nn.Parameter(tensor)
            else:
                self.register_buffer(key, tensor)
        self.nodes = [
            (n.op_type, list(n.input), list(n.output), _attributes(n)) for n in graph.node
        ]
        initializers = {i.name for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.output_names = [o.name for o in graph.output]

    def _value(self, name: str) -> torch.Tensor:
        key = self.keys[name]
        return self.weights[key] if key in self.weights else getattr(self, key)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env: dict[str, Any] = dict(zip(self.input_names, inputs, strict=True))
        for op, ins, outs, attrs in self.nodes:
            if op == "Constant":
                env[outs[0]] = torch.from_numpy(np.array(attrs["value"]))
                continue
            args = [(env[n] if n in env else self._value(n)) if n else None for n in ins]
            results = OPS[op](args, attrs)
            env.update(zip(outs, results, strict=False))
        return tuple(env[name] for name in self.output_names)

    def to_onnx(self) -> onnx.ModelProto:
        """A copy of the graph with the current weights; stale intermediate shapes dropped."""
        model = copy.deepcopy(self.model)
        state = {name: self._value(name).detach().cpu().numpy() for name in self.keys}
        for init in model.graph.initializer:
            init.CopyFrom(
                numpy_helper.from_array(
                    state[init.name].astype(numpy_helper.to_array(init).dtype), init.name
                )
            )
        del model.graph.value_info[:]
        return model
