"""Latency measurement: median of repeated runs after warm-up, on the target's providers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optimizers.onnxutil import make_session, providers_for


@dataclass(frozen=True)
class MeasureSettings:
    """How hard to measure: warm-up runs, at least ``min_repeats``, stop after ``max_seconds``
    (or ``max_repeats``) of timed runs."""

    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 50
    max_seconds: float = 3.0


def time_calls(fn: Callable[[], Any], settings: MeasureSettings = MeasureSettings()) -> dict:
    """Run ``fn`` ``warmup`` times, then time it; returns median, quartiles (p25/p75 and their
    spread ``iqr_ms``), p90 and min in ms, and the run count."""
    for _ in range(settings.warmup):
        fn()
    times: list[float] = []
    budget_end = time.perf_counter() + settings.max_seconds
    while len(times) < settings.max_repeats:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
        if len(times) >= settings.min_repeats and time.perf_counter() > budget_end:
            break
    ordered = sorted(times)
    q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else (ordered[0],) * 3
    return {
        "median_ms": float(statistics.median(ordered)),
        "p25_ms": float(q1),
        "p75_ms": float(q3),
        "iqr_ms": float(q3 - q1),
        "p90_ms": float(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]),
        "min_ms": float(ordered[0]),
        "runs": len(ordered),
    }


def onnx_latency(
    path: Path,
    feeds: dict[str, np.ndarray],
    target: str = "cpu",
    settings: MeasureSettings = MeasureSettings(),
    session: Any = None,
) -> dict:
    """Latency of an ONNX file on ``target`` for one batch ``feeds``; records the providers."""
    session = session or make_session(path, target)
    names = {i.name for i in session.get_inputs()}
    batch = {k: v for k, v in feeds.items() if k in names}
    result = time_calls(lambda: session.run(None, batch), settings)
    wanted, _usable = providers_for(target)
    result["providers"] = list(session.get_providers())
    if wanted[0] not in result["providers"]:
        result["note"] = f"{wanted[0]} unavailable here: measured on {result['providers'][0]}"
    return result


def torch_latency(
    model: Any,
    feeds: dict[str, np.ndarray],
    settings: MeasureSettings = MeasureSettings(),
    device: str = "cpu",
) -> dict:
    """Latency of a PyTorch module in eager mode (inference mode, FP32) on ``device`` (the
    module must already be there). Off the CPU every call copies its inputs in and its first
    output back, as an ONNX Runtime session run does, which also waits for the GPU."""
    import torch

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}

    def call() -> Any:
        with torch.inference_mode():
            if device == "cpu":
                return model(**tensors)
            out = model(**{k: t.to(device, non_blocking=True) for k, t in tensors.items()})
            return (out if torch.is_tensor(out) else out[0]).cpu()

    result = time_calls(call, settings)
    result["providers"] = ["pytorch-eager" if device == "cpu" else f"pytorch-eager-{device}"]
    return result
