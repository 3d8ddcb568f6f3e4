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
    tiles: tuple[int, ...] = (2, 4)  # F(2x2,3x3) and F(4x4,3x3)

    def __post_init__(self) -> None:
        if not self.tiles or set(self.tiles) - set(winograd.TRANSFORMS):
            raise ValueError(f"tiles must be a subset of (2, 4), got {self.tiles}")


def direct_conv_f64(x: np.ndarray, info: winograd.ConvInfo) -> np.ndarray:
    """The reference: direct convolution in float64 (torch), bias included."""
    import torch

    top, left, bottom, right = info.pads
    xt = torch.nn.functional.pad(torch.from_numpy(x.astype(np.float64)), (left, right, top, bottom))
    bias = None if info.bias is None else torch.from_numpy(info.bias.astype(np.float64))
    w = torch.from_numpy(info.weight.astype(np.float64))
    return torch.nn.functional.conv2d(xt, w, bias).numpy()


def measure_layer(info: winograd.ConvInfo, options: SelectOptions) -> dict:
    """Time and error of one conv: direct vs each Winograd tile size, side by side.

    Keys: ``direct_ms``; per tile size ``m``: ``f{m}_ms``, ``f{m}_max_abs_error``,
    ``f{m}_max_rel_error``; and for the fastest variant inside the bound (or the fastest
    overall): ``tile``, ``winograd_ms``, ``speedup``, ``max_abs_error``, ``max_rel_error``.
    """
    rng = np.random.default_rng(options.seed)
    _, c, h, w = info.in_shape
    n = options.batch_size
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    models = {"direct": winograd.single_conv_model(info, n, winograd=False)}
    for m in options.tiles:
        models[f"f{m}"] = winograd.single_conv_model(info, n, winograd=True, m=m)
    sessions = {name: timing.session(model, options.threads) for name, model in models.items()}
    ms = timing.median_ms(sessions, {"x": x}, repeats=options.repeats)
    probe = x[: min(n, 2)]
    reference = direct_conv_f64(probe, info)
    scale = float(np.abs(reference).max()) or 1.0
    row: dict = {"direct_ms": round(ms["direct"], 4)}
    for name in models:
        m = 2 if name == "direct" else int(name[1:])
        if name != "direct":
            row[f"{name}_ms"] = round(ms[name], 4)
        small = winograd.single_conv_model(info, len(probe), winograd=name != "direct", m=m)
        out = timing.session(small, options.threads).run(None, {"x": probe})[0]
        err = float(np.abs(out.astype(np.float64) - reference).max())
        row[f"{name}_max_abs_error"] = err
        row[f"{name}_max_rel_error"] = err / scale
    accurate = [m for m in options.tiles if row[f"f{m}_max_rel_error"] <= options.max_rel_error]
    pool = accurate or list(options.tiles)
    best = min(pool, key=lambda m: ms[f"f{m}"])
    row.update(
        tile=best,
        winograd_ms=row[f"f{best}_ms"],
        speedup=round(ms["direct"] / ms[f"f{best}"], 3),
        max_abs_error=row[f"f{best}_max_abs_error"],
        max_rel_error=row[f"f{best}_max_rel_error"],
    )
    return row


def select(
    model: onnx.ModelProto,
    options: SelectOptions,
    check: Callable[[], None] | None = None,
) -> tuple[dict[str, tuple[winograd.ConvInfo, int]], list[dict]]:
    """Measure every conv of ``model``; the convs to rewrite (output name -> (info, tile
    size)) and one report row per conv."""
    shapes = graph.static_shapes(model, options.batch_size)
    chosen: dict[str, tuple[winograd.ConvInfo, int]] = {}
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
        label = f"F({row['tile']}x{row['tile']},3x3)"
        if row["max_rel_error"] > options.max_rel_error:
            row.update(choice="direct", reason=f"error {row['max_rel_error']:.2e} over bound")
        elif row["speedup"] < options.min_speedup:
            row.update(choice="direct", reason=f"{label} slower ({row['speedup']:.2f}x of direct)")
        else:
            row.update(choice=f"winograd {label}", reason=f"{row['speedup']:.2f}x faster")
            chosen[node.output[0]] = (info, row["tile"])
        rows.append(row)
    return chosen, rows
