"""Triton statistics extension: counts from real batches, Triton's schema."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2

from serving.batching import DynamicBatcher, RequestTimings
from serving.statistics import ModelStatistics, empty_statistics, stats_response
from tests.fakes import FailingEngine, FakeEngine, batching_config


def test_statistics_count_requests_rows_and_batches():
    async def main():
        stats = ModelStatistics()
        engine = FakeEngine(delay_s=0.002)
        config = batching_config(max_batch_size=8, delay_us=1000)
        batcher = DynamicBatcher([engine], config, observer=stats)
        rng = np.random.default_rng(0)
        xs = [np.ones((int(n), 4), np.float32) for n in rng.integers(1, 4, 40)]
        results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
        for x, (_, timings) in zip(xs, results, strict=True):
            stats.record_success(timings, x.shape[0])
        await batcher.close()
        return stats, engine, xs, results

    before_ms = int(time.time() * 1000)
    stats, engine, xs, results = asyncio.run(main())
    entry = stats.to_dict("fake", "2")
    assert entry["name"] == "fake"
    assert entry["version"] == "2"
    assert entry["last_inference"] >= before_ms
    assert entry["inference_count"] == sum(x.shape[0] for x in xs)
    assert entry["execution_count"] == len(engine.batches)
    inference = entry["inference_stats"]
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[key]["count"] == len(xs)
    assert inference["fail"] == {"count": 0, "ns": 0}
    assert inference["queue"]["ns"] == sum(t.queue_ns for _, t in results)
    assert inference["compute_infer"]["ns"] >= len(xs) * 2_000_000
    assert inference["success"]["ns"] >= inference["queue"]["ns"] + inference["compute_infer"]["ns"]
    by_size = {b["batch_size"]: b for b in entry["batch_stats"]}
    assert sorted(by_size) == sorted(set(engine.batches))
    for size, batch in by_size.items():
        assert batch["compute_infer"]["count"] == engine.batches.count(size)
        assert batch["compute_infer"]["ns"] >= 2_000_000 * engine.batches.count(size)


def test_failures_are_counted_apart():
    async def main():
        stats = ModelStatistics()
        config = batching_config(max_batch_size=2)
        batcher = DynamicBatcher([FailingEngine()], config, observer=stats)
        start = time.perf_counter_ns()
        try:
            await batcher.submit({"x": np.ones((1, 4), np.float32)})
        except Exception:
            stats.record_failure(time.perf_counter_ns() - start)
        await batcher.close()
        return stats

    entry = asyncio.run(main()).to_dict("fake", "1")
    assert entry["inference_stats"]["fail"]["count"] == 1
    assert entry["inference_stats"]["fail"]["ns"] > 0
    assert entry["inference_stats"]["success"]["count"] == 0
    assert entry["execution_count"] == 0  # failed executions are not counted
    assert entry["batch_stats"] == []


def test_request_duration_can_be_given():
    stats = ModelStatistics()
    stats.record_success(RequestTimings(10, 20, 30, 40, 1), 1, request_ns=1000)
    assert stats.to_dict("m", "1")["inference_stats"]["success"] == {"count": 1, "ns": 1000}
    stats.record_success(RequestTimings(10, 20, 30, 40, 1), 1)
    assert stats.to_dict("m", "1")["inference_stats"]["success"] == {"count": 2, "ns": 1100}


def test_entries_parse_as_tritons_statistics_message():
    stats = ModelStatistics()
    stats.record_success(RequestTimings(1_000, 2_000, 3_000, 4_000, 4), 2)
    stats.batch_executed(4, 2_000, 3_000, 4_000)
    stats.record_failure(500)
    body = stats_response([stats.to_dict("m", "1"), empty_statistics("m", "2")])
    message = json_format.ParseDict(body, service_pb2.ModelStatisticsResponse())
    first, second = message.model_stats
    assert first.name == "m"
    assert first.version == "1"
    assert first.inference_count == 2
    assert first.execution_count == 1
    assert first.inference_stats.compute_infer.ns == 3_000
    assert first.inference_stats.fail.count == 1
    assert first.batch_stats[0].batch_size == 4
    assert first.batch_stats[0].compute_output.ns == 4_000
    assert second.inference_count == 0
    assert not second.batch_stats


def test_statistics_are_thread_safe():
    stats = ModelStatistics()
    timings = RequestTimings(1, 1, 1, 1, 1)

    def hammer():
        for _ in range(2000):
            stats.record_success(timings, 1)
            stats.batch_executed(1, 1, 1, 1)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entry = stats.to_dict("m", "1")
    assert entry["inference_count"] == 8000
    assert entry["execution_count"] == 8000
    assert entry["inference_stats"]["queue"] == {"count": 8000, "ns": 8000}
    assert entry["batch_stats"][0]["compute_input"]["count"] == 8000
