"""Latency medians of ONNX Runtime sessions (CPU), measured side by side."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import onnx

DEFAULT_THREADS: int | None = None
"""Intra-op threads for sessions that do not ask for a number (None: ORT's default)."""


def session(model: onnx.ModelProto | str, threads: int | None = None, providers=None):
    """An ``InferenceSession`` for a model proto or path (CPU unless ``providers`` given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = threads or DEFAULT_THREADS
    if threads:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(
        source, sess_options=options, providers=providers or ["CPUExecutionProvider"]
    )


def median_ms(
    sessions: Mapping[str, object],
    feeds: Mapping[str, dict[str, np.ndarray]] | dict[str, np.ndarray],
    *,
    warmup: int = 2,
    repeats: int = 7,
    min_seconds: float = 0.0,
) -> dict[str, float]:
    """Median milliseconds per run of each session, interleaved round by round.

    ``feeds`` is one feed dict for all, or one per session name. Rounds alternate between the
    sessions so machine noise hits them alike; at least ``repeats`` rounds, more until
    ``min_seconds`` elapsed.
    """
    per = {
        name: (feeds[name] if name in feeds and isinstance(feeds[name], dict) else feeds)
        for name in sessions
    }
    for _ in range(warmup):
        for name, sess in sessions.items():
            sess.run(None, per[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - start < min_seconds:
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, per[name])
            times[name].append((time.perf_counter() - t0) * 1000)
        rounds += 1
        if rounds >= 10 * max(repeats, 1):
            break
    return {name: float(np.median(values)) for name, values in times.items()}
