"""Retraining-free channel (filter) pruning for convolutional ONNX graphs.

1. Find prunable groups: a Conv whose output reaches exactly one consumer (a Conv, or a Gemm /
   MatMul through Flatten) only through channel-wise ops (BatchNorm, Relu/Clip, pooling).
2. Score every output channel on calibration data by Fisher information (Taylor, first order):
   ``I_c = mean_n (sum_hw a_nchw * dL/da_nchw)^2`` on the tensor the consumer reads; ``L`` is the
   cross-entropy against the labels, or against the model's own predictions without labels.
3. Remove the least important channels under a FLOPs budget (importance per FLOP saved,
   normalized per layer), physically shrinking the conv, its BatchNorm and bias, and the
   consumer's input channels.
4. Re-estimate BatchNorm statistics on calibration data: each consumer's output channels are
   given back the mean and standard deviation they had before pruning (on BatchNorm, or — where
   the exporter folded BatchNorm into the conv — as the conv's per-channel scale and shift).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from optimizers.cnn import graph, timing
from optimizers.cnn.torch_graph import TorchGraph

CHANNELWISE = {
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "BatchNormalization",
    "MaxPool",
    "AveragePool",
    "Identity",
    "Dropout",
}


@dataclass(frozen=True)
class PruneOptions:
    flops_budget: float = 0.5  # keep at most this fraction of the model's MACs
    min_keep: float = 0.1  # keep at least this fraction of each layer's channels
    criterion: str = "fisher_per_flop"  # or "fisher"
    reestimate: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.flops_budget <= 1:
            raise ValueError(f"flops_budget must be in (0, 1], got {self.flops_budget}")
        if not 0 < self.min_keep <= 1:
            raise ValueError(f"min_keep must be in (0, 1], got {self.min_keep}")
        if self.criterion not in ("fisher", "fisher_per_flop"):
            raise ValueError(f"criterion must be fisher or fisher_per_flop, not {self.criterion!r}")


@dataclass
class Group:
    """A prunable conv, the channel-wise ops after it, and the layer reading its channels."""

    conv: onnx.NodeProto
    chain: list[onnx.NodeProto]
    consumer: onnx.NodeProto
    flatten: onnx.NodeProto | None  # Flatten/Reshape between the chain and a Gemm/MatMul
    scored_tensor: str  # the tensor the consumer (or flatten) reads
    channels: int
    spatial: int  # H*W of ``scored_tensor`` (Gemm consumers read channel-major blocks)
    macs_per_out_channel: int
    macs_per_in_channel: int  # in the consumer


def macs(model: onnx.ModelProto, shapes: dict) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv / Gemm / MatMul (by output tensor)."""
    result = {}
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        if node.op_type == "Conv" and out:
            w = graph.array(model, node.input[1])
            if w is not None:
                result[node.output[0]] = int(np.prod(w.shape) * np.prod(out[2:]))
        elif node.op_type in ("Gemm", "MatMul") and out:
            w = graph.array(model, node.input[1])
            if w is not None:
                result[node.output[0]] = int(np.prod(w.shape) * np.prod(out[1:-1] or [1]))
    return result


def find_groups(model: onnx.ModelProto, shapes: dict) -> tuple[list[Group], list[dict]]:
    """Prunable groups, and a row per conv that cannot be pruned with the reason."""
    uses = graph.consumers(model)
    outputs = {o.name for o in model.graph.output}
    init_uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            init_uses[name] = init_uses.get(name, 0) + 1
    groups, declined = [], []
    for conv in model.graph.node:
        if conv.op_type != "Conv":
            continue
        reason = _group_or_reason(model, conv, uses, outputs, init_uses, shapes)
        if isinstance(reason, str):
            declined.append({"name": conv.name, "reason": reason})
        else:
            groups.append(reason)
    return groups, declined


def _group_or_reason(model, conv, uses, outputs, init_uses, shapes) -> Group | str:
    weight = graph.array(model, conv.input[1])
    if weight is None:
        return "weights are not constant"
    if graph.attr(conv, "group", 1) != 1:
        return "grouped/depthwise conv"
    if any(init_uses.get(name, 0) > 1 for name in conv.input[1:] if name):
        return "weights shared with another node"
    chain: list[onnx.NodeProto] = []
    tensor = conv.output[0]
    while True:
        if tensor in outputs:
            return "output is a graph output"
        readers = uses.get(tensor, [])
        if len(readers) != 1:
            return f"output read by {len(readers)} nodes (residual/branch)"
        reader = readers[0]
        if reader.op_type in CHANNELWISE and reader.input[0] == tensor:
            if reader.op_type == "BatchNormalization" and any(
                graph.array(model, n) is None for n in reader.input[1:]
            ):
                return "BatchNorm parameters are not constant"
            chain.append(reader)
            tensor = reader.output[0]
            continue
        break
    shape = shapes.get(tensor)
    if not shape or len(shape) != 4:
        return "channel tensor shape unknown"
    spatial = int(shape[2] * shape[3])
    flatten = None
    consumer = reader
    if reader.op_type in ("Flatten", "Reshape"):
        if reader.op_type == "Flatten" and graph.attr(reader, "axis", 1) != 1:
            return "Flatten axis != 1"
        if reader.op_type == "Reshape":
            target = graph.array(model, reader.input[1])
            if target is None or len(target) != 2 or target[1] != -1:
                return "Reshape to features is not [N, -1]"
        flat_readers = uses.get(reader.output[0], [])
        if len(flat_readers) != 1 or flat_readers[0].op_type not in ("Gemm", "MatMul"):
            return "flattened features not read by exactly one Gemm/MatMul"
        flatten, consumer = reader, flat_readers[0]
        if consumer.op_type == "Gemm" and graph.attr(consumer, "transA", 0):
            return "Gemm with transA"
    elif reader.op_type == "Conv":
        if graph.attr(reader, "group", 1) != 1:
            return "consumer is a grouped/depthwise conv"
        if reader.input[0] != tensor:
            return "consumer reads the channels as weights"
    else:
        return f"channels flow into {reader.op_type}"
    cw = graph.array(model, consumer.input[1])
    if cw is None:
        return "consumer weights are not constant"
    if init_uses.get(consumer.input[1], 0) > 1:
        return "consumer weights shared with another node"
    out_shape = shapes.get(consumer.output[0])
    conv_out = shapes.get(conv.output[0])
    if not out_shape or not conv_out:
        return "shapes unknown"
    k = weight.shape[0]
    if consumer.op_type == "Conv":
        per_in = int(cw.shape[0] * np.prod(cw.shape[2:]) * np.prod(out_shape[2:]))
    else:
        per_in = int(
            spatial
            * (cw.size // max(1, cw.shape[0] if _gemm_in_axis(consumer) == 0 else cw.shape[1]))
        )
    per_out = int(np.prod(weight.shape[1:]) * np.prod(conv_out[2:]))
    return Group(conv, chain, consumer, flatten, tensor, int(k), spatial, per_out, per_in)


def _gemm_in_axis(node: onnx.NodeProto) -> int:
    """Axis of the consumer weight that indexes input features."""
    if node.op_type == "Gemm" and graph.attr(node, "transB", 0):
        return 1
    return 0


def fisher_importance(
    model: onnx.ModelProto,
    groups: Sequence[Group],
    calibration: Sequence[dict[str, np.ndarray]],
    labels: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-channel Fisher importance of each group's channels (keyed by conv output name)."""
    tg = TorchGraph(model)
    names = [g.scored_tensor for g in groups]
    totals = {g.conv.output[0]: np.zeros(g.channels) for g in groups}
    seen = 0
    for feed in calibration:
        feeds = {
            k: torch.from_numpy(np.asarray(v)).requires_grad_(v.dtype.kind == "f")
            for k, v in feed.items()
        }
        values = tg.run(feeds, retain=names)
        logits = values[tg.outputs[0]]
        n = logits.shape[0]
        if labels is not None:
            target = torch.from_numpy(labels[seen : seen + n]).long()
        else:
            target = logits.detach().argmax(dim=1)
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        loss.backward()
        for g in groups:
            a = values[g.scored_tensor]
            grad = a.grad if a.grad is not None else torch.zeros_like(a)
            per_sample = (a.detach() * grad).sum(dim=(2, 3)).double()  # [N, C]
            totals[g.conv.output[0]] += (per_sample**2).sum(dim=0).numpy()
        seen += n
    return {name: total / max(seen, 1) for name, total in totals.items()}


def plan(
    groups: Sequence[Group],
    importance: dict[str, np.ndarray],
    layer_macs: dict[str, int],
    options: PruneOptions,
) -> dict[str, np.ndarray]:
    """Channels to keep per group (sorted indices) so the model's MACs fit the budget.

    Greedy over channels from least to most important (per MAC saved, normalized per layer);
    MACs are tracked exactly: a layer costs ``base * kept_out/out * kept_in/in``.
    """
    total = sum(layer_macs.values())
    target = options.flops_budget * total
    keep = {g.conv.output[0]: np.ones(g.channels, bool) for g in groups}
    by_name = {g.conv.output[0]: g for g in groups}
    out_of = {name: name for name in keep}  # layer whose output channels a group prunes
    in_of = {g.consumer.output[0]: g.conv.output[0] for g in groups}  # consumer -> group

    def fraction(layer: str) -> float:
        out_frac = keep[layer].mean() if layer in keep else 1.0
        in_frac = keep[in_of[layer]].mean() if layer in in_of else 1.0
        return float(out_frac * in_frac)

    def saving(name: str) -> float:
        g = by_name[name]
        conv, consumer = out_of[name], g.consumer.output[0]
        kept = keep[name].sum()
        conv_in = keep[in_of[conv]].mean() if conv in in_of else 1.0
        cons_out = keep[consumer].mean() if consumer in keep else 1.0
        return (layer_macs.get(conv, 0) * conv_in + layer_macs.get(consumer, 0) * cons_out) / (
            g.channels if kept else 1
        )

    candidates = []
    for g in groups:
        name = g.conv.output[0]
        scores = importance[name] / (importance[name].sum() + 1e-30)
        for c in range(g.channels):
            cost = scores[c] / saving(name) if options.criterion == "fisher_per_flop" else scores[c]
            candidates.append((cost, name, c))
    candidates.sort()
    current = sum(layer_macs[layer] * fraction(layer) for layer in layer_macs)
    for _, name, c in candidates:
        if current <= target:
            break
        g = by_name[name]
        if keep[name].sum() <= max(1, int(np.ceil(options.min_keep * g.channels))):
            continue
        current -= saving(name)
        keep[name][c] = False
    return {name: np.flatnonzero(mask) for name, mask in keep.items()}


def shrink(model: onnx.ModelProto, groups: Sequence[Group], keep: dict[str, np.ndarray]):
    """A copy of ``model`` with the pruned channels physically removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for g in groups:
        idx = keep[g.conv.output[0]]
        if len(idx) == g.channels:
            continue
        conv_inputs = list(g.conv.input)
        _take(out, conv_inputs[1], idx, 0)
        if len(conv_inputs) > 2 and conv_inputs[2]:
            _take(out, conv_inputs[2], idx, 0)
        for node in g.chain:
            if node.op_type == "BatchNormalization":
                for name in node.input[1:5]:
                    _take(out, name, idx, 0)
        weight = g.consumer.input[1]
        if g.consumer.op_type == "Conv":
            _take(out, weight, idx, 1)
        else:
            features = (idx[:, None] * g.spatial + np.arange(g.spatial)[None, :]).reshape(-1)
            _take(out, weight, features, _gemm_in_axis(g.consumer))
    del out.graph.value_info[:]
    return out


def _take(model: onnx.ModelProto, name: str, idx: np.ndarray, axis: int) -> None:
    value = graph.array(model, name)
    graph.replace_initializer(model, name, np.ascontiguousarray(np.take(value, idx, axis=axis)))


def _channel_stats(model: onnx.ModelProto, tensors: list[str], calibration) -> dict:
    """Per-channel mean and std of ``tensors`` over the calibration data (ORT)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = timing.session(probe)
    sums: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    for feed in calibration:
        for name, value in zip(tensors, sess.run(tensors, feed), strict=True):
            if value.ndim == 4:  # [N,C,H,W] -> samples x channels
                moved = np.moveaxis(value, 1, -1).reshape(-1, value.shape[1])
            else:
                moved = value.reshape(value.shape[0], -1)
            sums[name].append(moved.astype(np.float64))
    stats = {}
    for name, chunks in sums.items():
        data = np.concatenate(chunks)
        stats[name] = (data.mean(axis=0), data.std(axis=0))
    return stats


def reestimate(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    groups: Sequence[Group],
    keep: dict[str, np.ndarray],
    calibration: Sequence[dict[str, np.ndarray]],
) -> list[dict]:
    """Give each affected consumer's output channels their pre-pruning mean and std."""
    rows = []
    order = {node.output[0]: i for i, node in enumerate(pruned.graph.node)}
    affected = sorted(
        (g for g in groups if len(keep[g.conv.output[0]]) < g.channels),
        key=lambda g: order[g.consumer.output[0]],
    )
    for g in affected:
        name = g.consumer.output[0]
        (mu_o, sd_o) = _channel_stats(original, [name], calibration)[name]
        if name in keep:  # the consumer's own output channels were pruned too
            mu_o, sd_o = mu_o[keep[name]], sd_o[keep[name]]
        (mu_n, sd_n) = _channel_stats(pruned, [name], calibration)[name]
        scale = np.where(sd_n > 1e-8, sd_o / np.maximum(sd_n, 1e-8), 1.0)
        scale = np.clip(scale, 0.25, 4.0)
        shift = mu_o - mu_n * scale
        _affine(pruned, g.consumer, scale, shift)
        rows.append(
            {
                "layer": g.consumer.name or name,
                "mean_shift": float(np.abs(mu_o - mu_n).mean()),
                "std_ratio": float(np.mean(sd_o / np.maximum(sd_n, 1e-8))),
            }
        )
    return rows


def _affine(model: onnx.ModelProto, node: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray):
    """``y -> y * scale + shift`` per output channel, folded into the node's weights and bias."""
    w = graph.array(model, node.input[1])
    if node.op_type == "Conv":
        w = w * scale.reshape(-1, *([1] * (w.ndim - 1))).astype(np.float32)
    else:
        out_axis = 0 if _gemm_in_axis(node) == 1 else 1
        shape = [1, 1]
        shape[out_axis] = -1
        w = w * scale.reshape(shape).astype(np.float32)
    graph.replace_initializer(model, node.input[1], w.astype(np.float32))
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias_name is not None and graph.array(model, bias_name) is not None:
        b = graph.array(model, bias_name).astype(np.float64)
        graph.replace_initializer(model, bias_name, (b * scale + shift).astype(np.float32))
    else:
        bias_name = graph.unique_name(model, f"{node.name or node.output[0]}_bias")
        model.graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), bias_name))
        if node.op_type in ("Conv", "Gemm"):
            if len(node.input) == 2:
                node.input.append(bias_name)
            else:
                node.input[2] = bias_name
        else:
            raise ValueError(f"cannot add a bias to {node.op_type} {node.name}")


def prune_channels(
    model: onnx.ModelProto,
    calibration: Sequence[dict[str, np.ndarray]],
    options: PruneOptions = PruneOptions(),
    labels: np.ndarray | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """Prune ``model`` under ``options.flops_budget``; the smaller model and a report."""
    shapes = graph.static_shapes(model, 1)
    layer_macs = macs(model, shapes)
    total = sum(layer_macs.values())
    groups, declined = find_groups(model, shapes)
    report: dict = {
        "criterion": options.criterion,
        "flops_budget": options.flops_budget,
        "macs_before": total,
        "declined": declined,
    }
    if not groups:
        report.update(macs_after=total, layers=[])
        return model, report
    importance = fisher_importance(model, groups, calibration, labels)
    if check is not None:
        check()
    keep = plan(groups, importance, layer_macs, options)
    pruned = shrink(model, groups, keep)
    if options.reestimate:
        report["reestimated"] = reestimate(model, pruned, groups, keep, calibration)
    after = sum(macs(pruned, graph.static_shapes(pruned, 1)).values())
    report["macs_after"] = after
    report["macs_ratio"] = after / total if total else 1.0
    report["layers"] = [
        {
            "name": g.conv.name or g.conv.output[0],
            "channels": g.channels,
            "kept": len(keep[g.conv.output[0]]),
            "consumer": g.consumer.name,
        }
        for g in groups
    ]
    return pruned, report
