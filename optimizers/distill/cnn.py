"""Narrow CNN/MLP students: keep each layer's most important filters (L1 norm), sliced out of
the teacher's ONNX weights, and train them with KL divergence at temperature T on the logits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper, shape_inference
from torch import nn

from optimizers.distill.data import Split
from optimizers.distill.onnx_module import OnnxModule

# Operators that keep the channel axis one-to-one between their input and output.
_CHANNEL_PRESERVING = {
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "HardSwish",
    "Clip",
    "BatchNormalization",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Dropout",
    "Identity",
}


@dataclass(frozen=True)
class NarrowedLayer:
    """One producer whose output channels were cut, and the consumer that was sliced to match."""

    producer: str
    consumer: str
    channels: int
    kept: int


def _static_dims(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = shape_inference.infer_shapes(model)
    graph = inferred.graph
    return {v.name: _static_dims(v) for v in [*graph.value_info, *graph.input, *graph.output]}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _out_axis(node: onnx.NodeProto) -> int | None:
    """Axis of the producer's weight that indexes its output channels (None: not a producer)."""
    if node.op_type == "Conv" and _attr(node, "group", 1) == 1:
        return 0
    if node.op_type == "Gemm" and not _attr(node, "transA", 0):
        return 0 if _attr(node, "transB", 0) else 1
    return None


def _in_axis(node: onnx.NodeProto) -> int | None:
    """Axis of the consumer's weight that indexes its input channels (None: cannot slice)."""
    if node.op_type == "Conv" and _attr(node, "group", 1) == 1:
        return 1
    if node.op_type == "Gemm" and not _attr(node, "transA", 0):
        return 1 if _attr(node, "transB", 0) else 0
    return None


def narrow(model: onnx.ModelProto, fraction: float) -> tuple[onnx.ModelProto, list[NarrowedLayer]]:
    """A copy of ``model`` keeping ``fraction`` of the channels of every safely sliceable layer.

    A layer is sliced when its output (a Conv with group 1, or a Gemm) flows through
    channel-preserving ops (ReLU, BatchNorm, pooling ...) and optionally a Flatten into exactly
    one Conv/Gemm, every weight involved is used once, and it is not a graph output. The kept
    channels are those with the largest L1 norm of the producer's filters.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    users = _consumers(graph)
    outputs = {o.name for o in graph.output}
    shapes = _shapes(model)
    arrays = {name: numpy_helper.to_array(init).copy() for name, init in weights.items()}
    done: list[NarrowedLayer] = []
    for producer in graph.node:
        axis = _out_axis(producer)
        if axis is None or producer.input[1] not in weights:
            continue
        chain, tensor, spatial = [], producer.output[0], 1
        consumer = None
        while tensor not in outputs and len(users.get(tensor, [])) == 1:
            node = users[tensor][0]
            if node.op_type in _CHANNEL_PRESERVING and node.input[0] == tensor:
                chain.append(node)
                tensor = node.output[0]
            elif node.op_type == "Flatten" and _attr(node, "axis", 1) == 1 and spatial == 1:
                spatial = int(np.prod(shapes.get(tensor, [1, 1])[2:]))
                chain.append(node)
                tensor = node.output[0]
            else:
                consumer = node if node.input[0] == tensor else None
                break
        if consumer is None or _in_axis(consumer) is None or consumer.input[1] not in weights:
            continue
        involved = [producer.input[1], consumer.input[1]]
        involved += [n for n in producer.input[2:3] if n]
        bn_params = [
            n for node in chain if node.op_type == "BatchNormalization" for n in node.input[1:5]
        ]
        if any(n not in weights for n in bn_params):
            continue
        involved += bn_params
        if any(len(users.get(n, [])) != 1 for n in involved):
            continue
        channels = arrays[producer.input[1]].shape[axis]
        kept = max(1, round(channels * fraction))
        if kept >= channels:
            continue
        w = arrays[producer.input[1]]
        importance = np.abs(np.moveaxis(w, axis, 0)).reshape(channels, -1).sum(1)
        index = np.sort(np.argsort(-importance, kind="stable")[:kept])
        arrays[producer.input[1]] = np.take(w, index, axis=axis)
        for name in [*producer.input[2:3], *bn_params]:
            if name:
                arrays[name] = np.take(arrays[name], index, axis=-1)
        columns = (index[:, None] * spatial + np.arange(spatial)[None, :]).reshape(-1)
        arrays[consumer.input[1]] = np.take(
            arrays[consumer.input[1]], columns, axis=_in_axis(consumer)
        )
        done.append(
            NarrowedLayer(
                producer.name or producer.output[0],
                consumer.name or consumer.output[0],
                int(channels),
                int(kept),
            )
        )
    for init in graph.initializer:
        init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return model, done


def graph_flops(model: onnx.ModelProto) -> int:
    """Multiply-add FLOPs (2 per MAC) of one sample through Conv/Gemm/MatMul (batch dim = 1)."""
    shapes = _shapes(model)
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        if out is None:
            continue
        if node.op_type == "Conv" and node.input[1] in weights:
            total += 2 * int(np.prod(out)) * int(np.prod(weights[node.input[1]][1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0]) or []
            k = a[-1] if a and not _attr(node, "transA", 0) else (a[-2] if len(a) > 1 else 0)
            total += 2 * int(np.prod(out)) * int(k)
    return total


def count_parameters(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(i.dims) for i in model.graph.initializer if i.data_type == 1))


class LogitDistillTask:
    """KL divergence at temperature T between student and cached teacher logits."""

    def __init__(
        self,
        student: OnnxModule,
        inputs: np.ndarray,
        teacher_logits: np.ndarray,
        split: Split,
        *,
        temperature: float = 2.0,
        batch_size: int = 32,
    ) -> None:
        self.student = student
        self.inputs = torch.from_numpy(np.ascontiguousarray(inputs))
        self.teacher = torch.from_numpy(np.ascontiguousarray(teacher_logits, dtype=np.float32))
        self.split = split
        self.temperature = temperature
        self.batch_size = batch_size

    def epoch(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        order = rng.permutation(self.split.train)
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def loss(self, batch: np.ndarray) -> torch.Tensor:
        t = self.temperature
        index = torch.from_numpy(batch)
        logits = self.student(self.inputs[index])[0]
        target = nn.functional.log_softmax(self.teacher[index] / t, dim=-1)
        log_probs = nn.functional.log_softmax(logits / t, dim=-1)
        kl = nn.functional.kl_div(log_probs, target, log_target=True, reduction="batchmean")
        return kl * t * t

    def student_logits(self, index: np.ndarray) -> np.ndarray:
        self.student.eval()
        with torch.no_grad():
            return self.student(self.inputs[torch.from_numpy(index)])[0].numpy()

    def evaluate(self) -> float:
        """Top-1 agreement with the teacher on the held-out split."""
        holdout = self.split.holdout
        agree = self.student_logits(holdout).argmax(-1) == self.teacher[holdout].numpy().argmax(-1)
        return float(agree.mean())
