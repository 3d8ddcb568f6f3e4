"""Prometheus metrics: exact Triton names and counts after real batched requests."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from serving.batching import DynamicBatcher, MultiObserver, RequestTimings
from serving.errors import EngineError
from serving.metrics import GpuCollector, ServerMetrics
from serving.statistics import ModelStatistics
from tests.fakes import FailingEngine, FakeEngine, batching_config


def scrape(metrics: ServerMetrics) -> tuple[str, dict[tuple[str, tuple], float]]:
    """The exposition text and {(sample name, sorted labels): value}."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    text = body.decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def line_value(text: str, prefix: str) -> float:
    """The value of the exposition line starting with ``prefix`` (exact sample name)."""
    (line,) = [row for row in text.splitlines() if row.startswith(prefix)]
    return float(line.rsplit(" ", 1)[1])


def test_counters_and_histograms_after_n_requests():
    n = 30

    async def main(metrics: ServerMetrics, stats: ModelStatistics):
        engine = FakeEngine(delay_s=0.002)
        observer = MultiObserver([metrics.observer("fake", "1"), stats])
        batcher = DynamicBatcher(
            [engine], batching_config(max_batch_size=8, delay_us=1000), observer=observer
        )
        metrics.track_pending("fake", "1", lambda: batcher.queue_depth)
        rng = np.random.default_rng(5)
        xs = [np.ones((int(k), 4), np.float32) for k in rng.integers(1, 4, n)]

        async def one(x):
            start = time.perf_counter_ns()
            _, timings = await batcher.submit({"x": x})
            request_ns = time.perf_counter_ns() - start
            metrics.request_succeeded(
                "fake", "1", request_ns=request_ns, timings=timings, rows=x.shape[0]
            )
            return timings, request_ns

        results = await asyncio.gather(*(one(x) for x in xs))
        await batcher.close()
        return engine, xs, results

    metrics = ServerMetrics()
    stats = ModelStatistics()
    engine, xs, results = asyncio.run(main(metrics, stats))
    text, samples = scrape(metrics)
    labels = {"model": "fake", "version": "1"}
    rows = sum(x.shape[0] for x in xs)

    # Triton's exact names: no _total suffix on the sample lines or the TYPE lines.
    assert "# TYPE nv_inference_request_success counter" in text
    assert not [row for row in text.splitlines() if "nv_inference" in row and "_total" in row]
    prefix = 'nv_inference_request_success{model="fake",version="1"}'
    assert line_value(text, prefix) == n
    assert line_value(text, 'nv_inference_count{model="fake",version="1"}') == rows
    assert line_value(text, 'nv_inference_exec_count{model="fake",version="1"}') == len(
        engine.batches
    )
    queue_us = line_value(text, 'nv_inference_queue_duration_us{model="fake",version="1"}')
    assert queue_us == sum(t.queue_ns for t, _ in results) // 1000
    request_us = line_value(text, 'nv_inference_request_duration_us{model="fake",version="1"}')
    assert request_us == sum(ns for _, ns in results) // 1000
    infer_us = line_value(text, 'nv_inference_compute_infer_duration_us{model="fake",version="1"}')
    assert infer_us >= n * 2000  # each request's batch ran >= 2 ms
    assert value(samples, "nv_inference_pending_request_count", **labels) == 0

    for histogram in (
        "slimserve_request_duration_seconds",
        "slimserve_queue_duration_seconds",
        "slimserve_compute_infer_duration_seconds",
    ):
        assert value(samples, f"{histogram}_count", **labels) == n
        assert value(samples, f"{histogram}_bucket", le="+Inf", **labels) == n
    fast = value(samples, "slimserve_compute_infer_duration_seconds_bucket", le="0.001", **labels)
    assert fast == 0
    assert value(samples, "slimserve_batch_size_count", **labels) == len(engine.batches)
    assert value(samples, "slimserve_batch_size_sum", **labels) == rows
    small = sum(1 for b in engine.batches if b <= 2)
    assert value(samples, "slimserve_batch_size_bucket", le="2.0", **labels) == small
    assert stats.to_dict("fake", "1")["execution_count"] == len(engine.batches)


def test_failures_are_counted_by_reason():
    async def main(metrics: ServerMetrics):
        batcher = DynamicBatcher([FailingEngine()], batching_config(max_batch_size=2))
        for _ in range(3):
            start = time.perf_counter_ns()
            try:
                await batcher.submit({"x": np.ones((1, 4), np.float32)})
            except EngineError as exc:
                metrics.request_failed(
                    "fake", "1", reason=exc.reason, request_ns=time.perf_counter_ns() - start
                )
        await batcher.close()

    metrics = ServerMetrics()
    asyncio.run(main(metrics))
    metrics.request_failed("fake", "1", reason="invalid_input", request_ns=1_000)
    text, samples = scrape(metrics)
    assert "# TYPE nv_inference_request_failure counter" in text
    assert (
        line_value(text, 'nv_inference_request_failure{model="fake",reason="engine",version="1"}')
        == 3
    )
    assert (
        line_value(
            text, 'nv_inference_request_failure{model="fake",reason="invalid_input",version="1"}'
        )
        == 1
    )
    assert line_value(text, 'nv_inference_request_success{model="fake",version="1"}') == 0
    assert line_value(text, 'nv_inference_request_duration_us{model="fake",version="1"}') == 0
    histogram = ("slimserve_request_duration_seconds_count", (("model", "fake"), ("version", "1")))
    assert histogram not in samples  # histograms observe successes only


def test_pending_gauge_follows_the_queue():
    async def main(metrics: ServerMetrics):
        engine = FakeEngine()
        engine.release = threading.Event()
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=1))
        metrics.track_pending("fake", "1", lambda: batcher.queue_depth)
        tasks = [
            asyncio.ensure_future(batcher.submit({"x": np.ones((1, 4), np.float32)}))
            for _ in range(4)
        ]
        while not (engine.running.is_set() and batcher.queue_depth == 3):
            await asyncio.sleep(0.002)
        _, samples = scrape(metrics)
        pending = value(samples, "nv_inference_pending_request_count", model="fake", version="1")
        engine.release.set()
        await asyncio.gather(*tasks)
        await batcher.close()
        return pending

    metrics = ServerMetrics()
    assert asyncio.run(main(metrics)) == 3


def test_forget_removes_a_versions_label_sets():
    metrics = ServerMetrics()
    timings = RequestTimings(1_000, 1_000, 1_000, 1_000, 1)
    for version in ("1", "2"):
        metrics.request_succeeded("m", version, request_ns=5_000, timings=timings, rows=1)
        metrics.request_failed("m", version, reason="timeout", request_ns=5_000)
        metrics.observer("m", version).batch_executed(1, 1, 1, 1)
        metrics.track_pending("m", version, lambda: 0)
        metrics.set_fidelity("m", version, 0.99)
    metrics.forget("m", "1")
    metrics.forget("never-loaded", "9")
    text, _ = scrape(metrics)
    assert 'version="1"' not in text
    assert 'nv_inference_request_success{model="m",version="2"} 1.0' in text
    assert 'slimserve_model_fidelity{model="m",version="2"} 0.99' in text


def test_registries_are_independent_and_include_process_metrics():
    registry = CollectorRegistry()
    first = ServerMetrics(registry)
    second = ServerMetrics()
    assert first.registry is registry
    first.request_succeeded("m", "1", request_ns=1, timings=RequestTimings(0, 0, 0, 0, 1), rows=1)
    first_text, _ = scrape(first)
    second_text, _ = scrape(second)
    assert "nv_inference_request_success{" in first_text
    assert "nv_inference_request_success{" not in second_text
    assert "process_cpu_seconds_total" in first_text
    assert "process_resident_memory_bytes" in first_text


def test_a_broken_pending_callback_does_not_break_the_scrape():
    metrics = ServerMetrics()
    metrics.track_pending("m", "1", lambda: 1 // 0)
    metrics.track_pending("m", "2", lambda: 5)
    _, samples = scrape(metrics)
    assert value(samples, "nv_inference_pending_request_count", model="m", version="2") == 5
    assert ("nv_inference_pending_request_count", (("model", "m"), ("version", "1"))) not in samples


class FakeNvml:
    """The few NVML calls GpuCollector makes, with fixed readings (two GPUs)."""

    class _Rates:
        gpu = 37

    class _Memory:
        total = 80 * 2**30
        used = 3 * 2**30

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{handle}".encode() if handle == 0 else f"GPU-{handle}"

    def nvmlDeviceGetUtilizationRates(self, handle):
        return self._Rates()

    def nvmlDeviceGetMemoryInfo(self, handle):
        return self._Memory()

    def nvmlDeviceGetPowerUsage(self, handle):
        if handle == 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 123_456  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000


def test_gpu_collector_converts_nvml_readings_to_tritons_metrics():
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, gpu=False)
    assert metrics.gpu is None
    registry.register(GpuCollector(FakeNvml(), [0, 1]))
    _, samples = scrape(metrics)
    assert value(samples, "nv_gpu_utilization", gpu_uuid="GPU-0") == 0.37
    assert value(samples, "nv_gpu_memory_total_bytes", gpu_uuid="GPU-1") == 80 * 2**30
    assert value(samples, "nv_gpu_memory_used_bytes", gpu_uuid="GPU-0") == 3 * 2**30
    assert value(samples, "nv_gpu_power_usage", gpu_uuid="GPU-0") == 123.456
    assert value(samples, "nv_gpu_power_limit", gpu_uuid="GPU-1") == 700.0
    assert ("nv_gpu_power_usage", (("gpu_uuid", "GPU-1"),)) not in samples  # unsupported


def test_no_gpu_metrics_without_nvml():
    if GpuCollector.create() is not None:
        pytest.skip("this machine has NVML and a GPU")
    metrics = ServerMetrics()
    assert metrics.gpu is None
    text, _ = scrape(metrics)
    assert "nv_gpu_" not in text
    with pytest.raises(RuntimeError, match="NVML finds no GPU"):
        ServerMetrics(gpu=True)


@pytest.mark.gpu
def test_real_gpu_metrics():
    if GpuCollector.create() is None:
        pytest.skip("NVML (nvidia-ml-py, the 'gpu' extra) or an NVIDIA GPU is not available")
    metrics = ServerMetrics(gpu=True)
    _, samples = scrape(metrics)
    totals = [v for (name, _), v in samples.items() if name == "nv_gpu_memory_total_bytes"]
    assert totals
    assert all(total > 2**30 for total in totals)
