"""Per-layer measurement for the Winograd rewrite: keep it only where faster and accurate.

Every eligible convolution is timed as a one-layer ONNX Runtime model, original against its
Winograd form, at the target batch size (interleaved rounds, medians after warm-up), and its
error is measured against a float64 direct convolution. The rewrite is kept where it is at
least ``min_speedup`` faster and its relative error is inside ``max_rel_error``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from optimizers.cnn import graph, timing, winograd


@dataclass(frozen=True)
class SelectOptions:
    batch_size: int = 1
    min_speedup: float = 1.0
    max_rel_error: float = 1e-4
    repeats: int = 5
    threads: int | None = None
    seed: int = 0


def direct_conv_f64(x: np.ndarray, info: winograd.ConvInfo) -> np.ndarray:
    """The reference: direct convolution in float64 (torch), bias included."""
    import torch

    top, left, bottom, right = info.pads
    xt = torch.nn.functional.pad(torch.from_numpy(x.astype(np.float64)), (left, right, top, bottom))
    bias = None if info.bias is None else torch.from_numpy(info.bias.astype(np.float64))
    w = torch.from_numpy(info.weight.astype(np.float64))
    return torch.nn.functional.conv2d(xt, w, bias).numpy()


def measure_layer(info: winograd.ConvInfo, options: SelectOptions) -> dict:
    """Time and error of one conv, direct vs Winograd."""
    rng = np.random.default_rng(options.seed)
    _, c, h, w = info.in_shape
    n = options.batch_size
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    direct = timing.session(winograd.single_conv_model(info, n, winograd=False), options.threads)
    wino = timing.session(winograd.single_conv_model(info, n, winograd=True), options.threads)
    ms = timing.median_ms({"direct": direct, "winograd": wino}, {"x": x}, repeats=options.repeats)
    probe = x[: min(n, 2)]
    reference = direct_conv_f64(probe, info)
    wino_probe = timing.session(
        winograd.single_conv_model(info, len(probe), winograd=True), options.threads
    )
    direct_probe = timing.session(
        winograd.single_conv_model(info, len(probe), winograd=False), options.threads
    )
    scale = float(np.abs(reference).max()) or 1.0
    errors = {}
    for label, sess in (("winograd", wino_probe), ("direct", direct_probe)):
        diff = np.abs(sess.run(None, {"x": probe})[0].astype(np.float64) - reference)
        errors[label] = (float(diff.max()), float(diff.max()) / scale)
    return {
        "direct_ms": round(ms["direct"], 4),
        "winograd_ms": round(ms["winograd"], 4),
        "speedup": round(ms["direct"] / ms["winograd"], 3),
        "max_abs_error": errors["winograd"][0],
        "max_rel_error": errors["winograd"][1],
        "direct_max_abs_error": errors["direct"][0],
    }


def select(
    model: onnx.ModelProto,
    options: SelectOptions,
    check: Callable[[], None] | None = None,
) -> tuple[list[winograd.ConvInfo], list[dict]]:
    """Measure every conv of ``model``; the convs to rewrite and one report row per conv."""
    shapes = graph.static_shapes(model, options.batch_size)
    chosen: list[winograd.ConvInfo] = []
    rows: list[dict] = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        if check is not None:
            check()
        info = winograd.check_conv(model, node, shapes)
        row: dict = {"name": node.name or node.output[0]}
        weight = graph.array(model, node.input[1])
        if weight is not None:
            row["weight_shape"] = list(weight.shape)
        row["input_shape"] = list(shapes.get(node.input[0]) or [])
        if isinstance(info, str):
            row.update(choice="direct", reason=f"not eligible: {info}")
            rows.append(row)
            continue
        row.update(info.describe())
        row.update(measure_layer(info, options))
        if row["max_rel_error"] > options.max_rel_error:
            row.update(choice="direct", reason=f"error {row['max_rel_error']:.2e} over bound")
        elif row["speedup"] < options.min_speedup:
            row.update(choice="direct", reason=f"slower ({row['speedup']:.2f}x of direct)")
        else:
            row.update(choice="winograd", reason=f"{row['speedup']:.2f}x faster")
            chosen.append(info)
        rows.append(row)
    return chosen, rows
