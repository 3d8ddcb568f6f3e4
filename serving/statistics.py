"""Triton's statistics extension: what ``GET /v2/models/{m}/versions/{v}/stats`` returns.

One ``ModelStatistics`` per loaded model version accumulates request and batch timings
(thread-safe: batches report from worker threads). ``to_dict`` gives one entry of the
response's ``model_stats`` list, in the JSON shape ``tritonclient`` parses.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.batching import RequestTimings


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += int(ns)

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class _BatchStat:
    __slots__ = ("compute_infer", "compute_input", "compute_output")

    def __init__(self) -> None:
        self.compute_input = _Duration()
        self.compute_infer = _Duration()
        self.compute_output = _Duration()


class ModelStatistics:
    """Cumulative counts and durations of one model version; also a ``BatchObserver``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_inference_ms = 0
        self.inference_count = 0  # rows of successful requests
        self.execution_count = 0  # batches executed
        self.success = _Duration()
        self.fail = _Duration()
        self.queue = _Duration()
        self.compute_input = _Duration()
        self.compute_infer = _Duration()
        self.compute_output = _Duration()
        self._batches: dict[int, _BatchStat] = {}

    def record_success(
        self, timings: RequestTimings, rows: int, *, request_ns: int | None = None
    ) -> None:
        """Count one successful request of ``rows`` rows; ``request_ns`` is its end-to-end
        time (defaults to queue + compute)."""
        if request_ns is None:
            request_ns = (
                timings.queue_ns
                + timings.compute_input_ns
                + timings.compute_infer_ns
                + timings.compute_output_ns
            )
        with self._lock:
            self.last_inference_ms = int(time.time() * 1000)
            self.inference_count += rows
            self.success.add(request_ns)
            self.queue.add(timings.queue_ns)
            self.compute_input.add(timings.compute_input_ns)
            self.compute_infer.add(timings.compute_infer_ns)
            self.compute_output.add(timings.compute_output_ns)

    def record_failure(self, request_ns: int) -> None:
        """Count one failed request that took ``request_ns``."""
        with self._lock:
            self.last_inference_ms = int(time.time() * 1000)
            self.fail.add(request_ns)

    def batch_executed(
        self, batch_size: int, compute_input_ns: int, compute_infer_ns: int, compute_output_ns: int
    ) -> None:
        """Count one executed batch of ``batch_size`` rows (the ``BatchObserver`` hook)."""
        with self._lock:
            self.execution_count += 1
            stat = self._batches.get(batch_size)
            if stat is None:
                stat = self._batches[batch_size] = _BatchStat()
            stat.compute_input.add(compute_input_ns)
            stat.compute_infer.add(compute_infer_ns)
            stat.compute_output.add(compute_output_ns)

    def to_dict(self, name: str, version: str) -> dict[str, Any]:
        """One ``model_stats`` entry in Triton's JSON format."""
        zero = {"count": 0, "ns": 0}
        with self._lock:
            return {
                "name": name,
                "version": str(version),
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.to_dict(),
                    "fail": self.fail.to_dict(),
                    "queue": self.queue.to_dict(),
                    "compute_input": self.compute_input.to_dict(),
                    "compute_infer": self.compute_infer.to_dict(),
                    "compute_output": self.compute_output.to_dict(),
                    "cache_hit": dict(zero),
                    "cache_miss": dict(zero),
                },
                "response_stats": {},
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": stat.compute_input.to_dict(),
                        "compute_infer": stat.compute_infer.to_dict(),
                        "compute_output": stat.compute_output.to_dict(),
                    }
                    for size, stat in sorted(self._batches.items())
                ],
                "memory_usage": [],
            }


def empty_statistics(name: str, version: str) -> dict[str, Any]:
    """The entry of a version that has not served anything yet."""
    return ModelStatistics().to_dict(name, version)


def stats_response(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The full ``.../stats`` response body for the given ``to_dict`` entries."""
    return {"model_stats": entries}
