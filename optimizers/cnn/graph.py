"""Small ONNX graph helpers shared by the CNN passes."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference


def load(path: Path | str) -> onnx.ModelProto:
    """Load a model (external data included)."""
    return onnx.load(str(path))


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Save ``model``; large models get their weights as external data beside the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > 1_800_000_000
    onnx.save(
        model,
        str(path),
        save_as_external_data=large,
        location=path.name + ".data" if large else None,
    )
    return path


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> nodes reading it."""
    table: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            if name:
                table[name].append(node)
    return table


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> node writing it."""
    return {out: node for node in model.graph.node for out in node.output}


def attr(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, attribute in enumerate(node.attribute):
        if attribute.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The initializer ``name`` as numpy, or None when it is not a constant initializer."""
    init = initializers(model).get(name)
    return None if init is None else numpy_helper.to_array(init)


def replace_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise KeyError(name)


def with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy whose graph inputs have a fixed batch dimension, shapes inferred."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    init_names = {i.name for i in fixed.graph.initializer}
    for value in fixed.graph.input:
        if value.name in init_names:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    del fixed.graph.value_info[:]
    return shape_inference.infer_shapes(fixed, data_prop=True)


def static_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, tuple[int, ...] | None]:
    """Tensor name -> shape with the batch fixed to ``batch`` (None where not fully known)."""
    inferred = with_batch(model, batch)
    shapes: dict[str, tuple[int, ...] | None] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        known = all(d.HasField("dim_value") for d in dims)
        shapes[value.name] = tuple(d.dim_value for d in dims) if known else None
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def unique_name(model: onnx.ModelProto, base: str) -> str:
    """``base`` or ``base_N`` not yet used as a tensor or node name in ``model``."""
    used = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        used.update(node.output)
        used.add(node.name)
    name, n = base, 0
    while name in used:
        n += 1
        name = f"{base}_{n}"
    return name


def input_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that are not initializers."""
    init_names = {i.name for i in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in init_names]
