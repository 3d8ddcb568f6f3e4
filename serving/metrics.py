"""Prometheus metrics: Triton's ``nv_inference_*`` counters plus latency histograms.

Everything lives on an injected ``CollectorRegistry`` (tests get a fresh one). The Triton
counters are exposed under Triton's exact names, without the ``_total`` suffix that
prometheus_client adds to counters, so dashboards written for Triton work unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from serving.batching import BatchObserver, RequestTimings

log = logging.getLogger(__name__)

LABELS = ("model", "version")
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PADDING_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

# Triton's cumulative counters: name -> help. Durations are microseconds.
COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (rows; does not include cached)",
    "nv_inference_exec_count": "Number of model executions performed (batches)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
    "nv_inference_compute_input_duration_us": ("Cumulative compute input duration in microseconds"),
    "nv_inference_compute_infer_duration_us": (
        "Cumulative compute inference duration in microseconds"
    ),
    "nv_inference_compute_output_duration_us": (
        "Cumulative inference compute output duration in microseconds"
    ),
}
FAILURE = "nv_inference_request_failure"
FAILURE_HELP = "Number of failed inference requests, all batch sizes"
PENDING = "nv_inference_pending_request_count"
PENDING_HELP = "Instantaneous number of pending requests awaiting execution per-model."
_DURATIONS_NS = {
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
}


class _Observer:
    """The ``BatchObserver`` of one model version: execution count and batch sizes."""

    def __init__(self, metrics: ServerMetrics, model: str, version: str) -> None:
        self._metrics = metrics
        self._key = (model, version)

    def batch_executed(
        self, batch_size: int, compute_input_ns: int, compute_infer_ns: int, compute_output_ns: int
    ) -> None:
        self._metrics._add(self._key, "nv_inference_exec_count", 1)
        self._metrics.batch_size.labels(*self._key).observe(batch_size)

    def batch_padding(self, real_tokens: int, computed_tokens: int) -> None:
        """A variable-length batch: real tokens vs the token slots it computed (padded)."""
        metrics = self._metrics
        if computed_tokens > 0:
            metrics.padding_ratio.labels(*self._key).observe(real_tokens / computed_tokens)
        metrics.batch_tokens.labels(*self._key, "real").inc(real_tokens)
        metrics.batch_tokens.labels(*self._key, "computed").inc(computed_tokens)


class _TritonCollector:
    """Yields the Triton counters and the pending-request gauge at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        counters, failures, pending = self._metrics._snapshot()
        for name, help_text in COUNTERS.items():
            family = Metric(name, help_text, "counter")
            for (model, version), values in counters.items():
                value = values.get(name, 0)
                if name in _DURATIONS_NS:
                    value //= 1000
                family.add_sample(name, {"model": model, "version": version}, value)
            yield family
        family = Metric(FAILURE, FAILURE_HELP, "counter")
        for (model, version, reason), value in failures.items():
            labels = {"model": model, "version": version, "reason": reason}
            family.add_sample(FAILURE, labels, value)
        yield family
        gauge = GaugeMetricFamily(PENDING, PENDING_HELP, labels=LABELS)
        for (model, version), fn in pending.items():
            try:
                value = fn()
            except Exception:
                log.exception("pending-count callback of %s/%s failed", model, version)
                continue
            gauge.add_metric([model, version], value)
        yield gauge


class GpuCollector:
    """Triton's GPU metrics from NVML (``nvidia-ml-py``), one label set per GPU UUID.

    ``GpuCollector.create()`` returns None when NVML is not installed or finds no GPU,
    so CPU-only servers export no GPU metrics rather than failing.
    """

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles
        self._uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]

    @classmethod
    def create(cls) -> GpuCollector | None:
        try:
            import pynvml as nvml
        except ImportError:
            return None
        try:
            nvml.nvmlInit()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        except Exception as exc:  # NVMLError: no driver, no device
            log.info("NVML unavailable, no GPU metrics: %s", exc)
            return None
        return cls(nvml, handles) if handles else None

    def collect(self) -> Iterator[Metric]:
        nvml = self._nvml
        families = {
            "nv_gpu_utilization": GaugeMetricFamily(
                "nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"]
            ),
            "nv_gpu_memory_total_bytes": GaugeMetricFamily(
                "nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=["gpu_uuid"]
            ),
            "nv_gpu_memory_used_bytes": GaugeMetricFamily(
                "nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"]
            ),
            "nv_gpu_power_usage": GaugeMetricFamily(
                "nv_gpu_power_usage", "GPU power usage in watts", labels=["gpu_uuid"]
            ),
            "nv_gpu_power_limit": GaugeMetricFamily(
                "nv_gpu_power_limit", "GPU power management limit in watts", labels=["gpu_uuid"]
            ),
        }
        for uuid, handle in zip(self._uuids, self._handles, strict=True):
            readings = (
                ("nv_gpu_utilization", lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100),
                ("nv_gpu_memory_total_bytes", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).total),
                ("nv_gpu_memory_used_bytes", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used),
                ("nv_gpu_power_usage", lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000),
                ("nv_gpu_power_limit", lambda h: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000),
            )
            for name, read in readings:
                try:
                    families[name].add_metric([uuid], float(read(handle)))
                except Exception:  # a reading this GPU does not support
                    continue
        yield from families.values()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ServerMetrics:
    """All of the server's metrics on one registry.

    Triton counters are plain integers updated under a lock (cheap on the request path)
    and rendered by a custom collector; histograms are prometheus_client ``Histogram``s.
    Histograms observe successful requests only; failures are counted by reason.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, gpu: bool | None = None
    ) -> None:
        """``gpu``: export NVML GPU metrics (None: when NVML finds a GPU)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str], dict[str, int]] = {}
        self._failures: dict[tuple[str, str, str], int] = {}
        self._pending: dict[tuple[str, str], Callable[[], int]] = {}
        self.registry.register(_TritonCollector(self))
        self.request_duration = Histogram(
            "slimserve_request_duration_seconds",
            "End-to-end inference request duration (successful requests)",
            LABELS,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.queue_duration = Histogram(
            "slimserve_queue_duration_seconds",
            "Time requests waited in the batcher queue",
            LABELS,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.compute_infer_duration = Histogram(
            "slimserve_compute_infer_duration_seconds",
            "Engine execution time of the batch each request ran in",
            LABELS,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "slimserve_batch_size",
            "Rows per executed batch",
            LABELS,
            registry=self.registry,
            buckets=BATCH_BUCKETS,
        )
        self.padding_ratio = Histogram(
            "slimserve_batch_padding_ratio",
            "Real tokens / computed token slots per batch of a variable-length model",
            LABELS,
            registry=self.registry,
            buckets=PADDING_BUCKETS,
        )
        self.batch_tokens = Counter(
            "slimserve_batch_tokens",
            "Token slots of variable-length batches: kind=real (sent) or computed (padded)",
            (*LABELS, "kind"),
            registry=self.registry,
        )
        self.fidelity = Gauge(
            "slimserve_model_fidelity",
            "Measured fidelity of a compressed version to its original (e.g. cosine)",
            LABELS,
            registry=self.registry,
        )
        self._histograms = (
            self.request_duration,
            self.queue_duration,
            self.compute_infer_duration,
            self.batch_size,
            self.padding_ratio,
            self.fidelity,
        )
        ProcessCollector(registry=self.registry)
        self.gpu = GpuCollector.create() if gpu is not False else None
        if gpu and self.gpu is None:
            raise RuntimeError("GPU metrics were requested but NVML finds no GPU")
        if self.gpu is not None:
            self.registry.register(self.gpu)

    # ------------------------------------------------------------------ updates

    def observer(self, model: str, version: str) -> BatchObserver:
        """The batch observer to give the model version's ``DynamicBatcher``."""
        return _Observer(self, model, str(version))

    def request_succeeded(
        self, model: str, version: str, *, request_ns: int, timings: RequestTimings, rows: int
    ) -> None:
        """Count one successful request of ``rows`` rows."""
        key = (model, str(version))
        with self._lock:
            values = self._counters.setdefault(key, {})
            for name, amount in (
                ("nv_inference_request_success", 1),
                ("nv_inference_count", rows),
                ("nv_inference_request_duration_us", request_ns),
                ("nv_inference_queue_duration_us", timings.queue_ns),
                ("nv_inference_compute_input_duration_us", timings.compute_input_ns),
                ("nv_inference_compute_infer_duration_us", timings.compute_infer_ns),
                ("nv_inference_compute_output_duration_us", timings.compute_output_ns),
            ):
                values[name] = values.get(name, 0) + int(amount)
        self.request_duration.labels(*key).observe(request_ns / 1e9)
        self.queue_duration.labels(*key).observe(timings.queue_ns / 1e9)
        self.compute_infer_duration.labels(*key).observe(timings.compute_infer_ns / 1e9)

    def request_failed(self, model: str, version: str, *, reason: str, request_ns: int) -> None:
        """Count one failed request; ``reason`` becomes the ``reason`` label.

        As in Triton, durations and histograms cover successful requests only;
        ``request_ns`` is accepted for symmetry (the statistics extension records it).
        """
        key = (model, str(version))
        with self._lock:
            self._failures[(*key, reason)] = self._failures.get((*key, reason), 0) + 1
            self._counters.setdefault(key, {})

    def track_pending(self, model: str, version: str, fn: Callable[[], int]) -> None:
        """Report ``fn()`` as the version's pending-request gauge at every scrape."""
        key = (model, str(version))
        with self._lock:
            self._pending[key] = fn
            self._counters.setdefault(key, {})

    def set_fidelity(self, model: str, version: str, value: float) -> None:
        """Publish the measured fidelity of a compressed version (from its report)."""
        self.fidelity.labels(model, str(version)).set(value)

    def forget(self, model: str, version: str) -> None:
        """Drop every label set of an unloaded version."""
        key = (model, str(version))
        with self._lock:
            self._counters.pop(key, None)
            self._pending.pop(key, None)
            for failure in [f for f in self._failures if f[:2] == key]:
                del self._failures[failure]
        for metric in self._histograms:
            with contextlib.suppress(KeyError):
                metric.remove(*key)
        for kind in ("real", "computed"):
            with contextlib.suppress(KeyError):
                self.batch_tokens.remove(*key, kind)

    def _add(self, key: tuple[str, str], name: str, amount: int) -> None:
        with self._lock:
            values = self._counters.setdefault(key, {})
            values[name] = values.get(name, 0) + amount

    def _snapshot(self):
        with self._lock:
            counters = {key: dict(values) for key, values in self._counters.items()}
            return counters, dict(self._failures), dict(self._pending)

    # ---------------------------------------------------------------- exposition

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        text = generate_latest(self.registry).decode("utf-8")
        # prometheus_client names counter families "<name>_total"; Triton's have no suffix.
        for name in (*COUNTERS, FAILURE):
            text = text.replace(f"# HELP {name}_total ", f"# HELP {name} ", 1)
            text = text.replace(f"# TYPE {name}_total counter", f"# TYPE {name} counter", 1)
        return text.encode("utf-8"), CONTENT_TYPE_LATEST
