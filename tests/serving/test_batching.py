"""DynamicBatcher: correct rows per caller, batching, queue policies, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from serving.batching import DynamicBatcher, MultiObserver, QueuePolicy, RequestTimings
from serving.errors import (
    EngineError,
    InvalidInput,
    QueueFull,
    QueueTimeout,
    ServerShuttingDown,
)
from tests.fakes import FailingEngine, FakeEngine, batching_config, double_plus_rowsum, until


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def blocked_engine(**kwargs) -> FakeEngine:
    engine = FakeEngine(**kwargs)
    engine.release = threading.Event()
    return engine


def rows(n: int, value: float, width: int = 4) -> np.ndarray:
    return np.full((n, width), value, dtype=np.float32)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int]] = []

    def batch_executed(self, batch_size, compute_input_ns, compute_infer_ns, compute_output_ns):
        self.calls.append((batch_size, compute_input_ns, compute_infer_ns, compute_output_ns))


# ------------------------------------------------------------------------ correctness


def test_concurrent_callers_get_exactly_their_rows_back():
    async def main():
        engine = FakeEngine(delay_s=0.003)
        recorder = Recorder()
        batcher = DynamicBatcher(
            [engine], batching_config(max_batch_size=8, delay_us=2000), observer=recorder
        )
        rng = np.random.default_rng(7)
        sizes = rng.integers(1, 5, 80)
        xs = [rng.standard_normal((int(n), 4)).astype(np.float32) for n in sizes]
        results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
        for x, (outputs, timings) in zip(xs, results, strict=True):
            np.testing.assert_allclose(outputs["y"], double_plus_rowsum(x), rtol=1e-6)
            assert outputs["n"].shape == (x.shape[0], 1)
            assert int(outputs["n"][0, 0]) == timings.batch_size  # rows of its batch
            assert timings.batch_size >= x.shape[0]
            assert timings.queue_ns > 0
            assert timings.compute_infer_ns >= 3_000_000
        assert sum(engine.batches) == sum(x.shape[0] for x in xs)
        assert max(engine.batches) <= 8
        assert max(engine.batches) > 4  # requests were really merged
        assert len(engine.batches) < len(xs)
        assert [c[0] for c in recorder.calls] == engine.batches
        await batcher.close()
        assert batcher.in_flight == 0

    run(main())


def test_only_matching_shapes_and_dtypes_are_merged():
    async def main():
        engine = blocked_engine()
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=16))
        first = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        rng = np.random.default_rng(3)
        xs = []
        for i in range(30):
            width = (4, 6)[i % 2]
            dtype = (np.float32, np.float64)[(i // 2) % 2]
            xs.append(rng.standard_normal((int(rng.integers(1, 3)), width)).astype(dtype))
        tasks = [asyncio.ensure_future(batcher.submit({"x": x})) for x in xs]
        await until(lambda: batcher.queue_depth == 30)
        engine.release.set()
        results = await asyncio.gather(first, *tasks)
        for x, (outputs, _) in zip(xs, results[1:], strict=True):
            assert outputs["y"].dtype == x.dtype
            np.testing.assert_allclose(outputs["y"], double_plus_rowsum(x), rtol=1e-6)
        # one batch for the first request, then one per (width, dtype) group
        assert len(engine.batches) == 5
        for seen in engine.seen[1:]:
            assert seen.shape[1] in (4, 6)
        await batcher.close()

    run(main())


def test_each_caller_gets_only_the_outputs_it_asked_for():
    async def main():
        engine = blocked_engine()
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=8))
        first = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        a = asyncio.ensure_future(batcher.submit({"x": rows(2, 1.0)}, output_names=["n"]))
        b = asyncio.ensure_future(batcher.submit({"x": rows(1, 2.0)}, output_names=["y"]))
        c = asyncio.ensure_future(batcher.submit({"x": rows(1, 3.0)}))
        await until(lambda: batcher.queue_depth == 3)
        engine.release.set()
        await first
        (out_a, _), (out_b, _), (out_c, _) = await asyncio.gather(a, b, c)
        assert list(out_a) == ["n"]
        assert list(out_b) == ["y"]
        assert set(out_c) == {"y", "n"}
        np.testing.assert_array_equal(out_b["y"], double_plus_rowsum(rows(1, 2.0)))
        assert engine.batches == [1, 4]
        await batcher.close()

    run(main())


def test_requests_are_checked_before_queueing():
    async def main():
        batcher = DynamicBatcher([FakeEngine()], batching_config(max_batch_size=4))
        with pytest.raises(InvalidInput, match=r"batch size 5 is outside 1\.\.4"):
            await batcher.submit({"x": rows(5, 1.0)})
        with pytest.raises(InvalidInput, match=r"no output\(s\) z"):
            await batcher.submit({"x": rows(1, 1.0)}, output_names=["z"])
        with pytest.raises(InvalidInput, match="at least one input"):
            await batcher.submit({})
        with pytest.raises(InvalidInput, match="disagree on the batch size"):
            await batcher.submit({"x": rows(1, 1.0), "w": rows(2, 1.0)})
        await batcher.close()

    run(main())


def test_model_without_batching_gets_inputs_unchanged():
    async def main():
        engine = FakeEngine(delay_s=0.002)
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=0, dynamic=False))
        xs = [rows(3, float(i)) for i in range(10)]
        results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
        for x, (outputs, timings) in zip(xs, results, strict=True):
            np.testing.assert_array_equal(outputs["y"], double_plus_rowsum(x))
            assert timings.batch_size == 1  # one inference per request, as Triton counts it
        assert engine.batches == [3] * 10
        await batcher.close()

    run(main())


def test_without_dynamic_batching_requests_run_one_by_one():
    async def main():
        engine = FakeEngine(delay_s=0.002)
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=8, dynamic=False))
        await asyncio.gather(*(batcher.submit({"x": rows(1, float(i))}) for i in range(12)))
        assert engine.batches == [1] * 12
        await batcher.close()

    run(main())


def test_preferred_batch_size_dispatches_without_waiting_for_the_delay():
    async def main():
        engine = blocked_engine()
        config = batching_config(max_batch_size=8, delay_us=20_000_000, preferred=(4,))
        batcher = DynamicBatcher([engine], config)
        engine.release.set()
        # four single-row requests reach the preferred size 4: no 20 s wait.
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit({"x": rows(1, float(i))}) for i in range(4))), 5
        )
        assert engine.batches == [4]
        assert all(t.batch_size == 4 for _, t in results)
        await batcher.close()

    run(main())


def test_max_queue_delay_lets_a_partial_batch_go():
    async def main():
        engine = FakeEngine()
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=8, delay_us=30_000))
        _, timings = await asyncio.wait_for(batcher.submit({"x": rows(2, 1.0)}), 5)
        assert engine.batches == [2]
        assert timings.queue_ns >= 30_000_000  # waited for companions that never came
        await batcher.close()

    run(main())


def test_instances_run_batches_in_parallel():
    async def main():
        engines = [blocked_engine(), blocked_engine()]
        batcher = DynamicBatcher(engines, batching_config(max_batch_size=1, instances=2))
        tasks = [asyncio.ensure_future(batcher.submit({"x": rows(1, float(i))})) for i in range(2)]
        # both engines are inside infer() at the same time
        await until(lambda: all(e.running.is_set() for e in engines))
        assert batcher.in_flight == 2
        assert batcher.queue_depth == 0
        for engine in engines:
            engine.release.set()
        await asyncio.gather(*tasks)
        assert sorted(len(e.batches) for e in engines) == [1, 1]
        await batcher.close()

    run(main())


def test_idle_instances_share_the_waiting_rows():
    """Eight rows waiting and two idle instances: 4 + 4 side by side, not 8 on one instance
    while the other idles."""

    async def main():
        engines = [FakeEngine(), FakeEngine()]
        batcher = DynamicBatcher(engines, batching_config(max_batch_size=8, instances=2))
        results = await asyncio.gather(
            *(batcher.submit({"x": rows(1, float(i))}) for i in range(8))
        )
        assert sorted(e.batches for e in engines) == [[4], [4]]
        for i, (outputs, timings) in enumerate(results):
            assert timings.batch_size == 4
            np.testing.assert_allclose(outputs["y"], double_plus_rowsum(rows(1, float(i))))
        await batcher.close()

    run(main())


def test_a_share_still_waits_for_the_queue_delay():
    """The share cap does not launch a lone request early: with two idle instances one
    request still waits up to max_queue_delay for companions, and they join it."""

    async def main():
        engines = [FakeEngine(), FakeEngine()]
        config = batching_config(max_batch_size=8, delay_us=200_000, instances=2)
        batcher = DynamicBatcher(engines, config)
        first = asyncio.ensure_future(batcher.submit({"x": rows(1, 1.0)}))
        await asyncio.sleep(0.02)
        assert engines[0].calls + engines[1].calls == 0  # still waiting for companions
        rest = [batcher.submit({"x": rows(1, 2.0)}) for _ in range(3)]
        await asyncio.gather(first, *rest)
        # at the deadline 4 rows wait for 2 idle instances: the lone request's batch has 2
        seen = [x for engine in engines for x in engine.seen]
        assert [len(x) for x in seen if 1.0 in x] == [2]
        assert sum(len(x) for x in seen) == 4
        await batcher.close()

    run(main())


def test_next_batch_starts_before_the_finished_callers_resume():
    """A freed instance takes the waiting batch at once; it does not idle while the event
    loop hands the finished batch's callers their results."""

    async def main():
        engine = blocked_engine()
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=1))

        async def first_caller() -> int:
            await batcher.submit({"x": rows(1, 1.0)})
            return batcher.queue_depth  # seen the moment this caller resumes

        first = asyncio.ensure_future(first_caller())
        await until(engine.running.is_set)
        second = asyncio.ensure_future(batcher.submit({"x": rows(1, 2.0)}))
        await until(lambda: batcher.queue_depth == 1)
        engine.release.set()
        assert await first == 0  # the second request had already left for the engine
        await second
        assert engine.batches == [1, 1]
        await batcher.close()

    run(main())


# ---------------------------------------------------------------------- queue policies


def test_full_queue_rejects_immediately():
    async def main():
        engine = blocked_engine()
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=1, max_queue_size=2))
        running = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        queued = [asyncio.ensure_future(batcher.submit({"x": rows(1, 1.0)})) for _ in range(2)]
        await until(lambda: batcher.queue_depth == 2)
        with pytest.raises(QueueFull, match="max_queue_size 2") as info:
            await batcher.submit({"x": rows(1, 2.0)})
        assert info.value.status_code == 503
        engine.release.set()
        await asyncio.gather(running, *queued)
        await batcher.close()

    run(main())


def test_queue_timeout_fires_while_the_only_instance_is_busy():
    async def main():
        engine = blocked_engine()
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=4))
        running = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        with pytest.raises(QueueTimeout, match="timed out after waiting") as info:
            await batcher.submit({"x": rows(1, 1.0)}, timeout_us=50_000)
        assert info.value.status_code == 504
        assert engine.running.is_set()  # the instance never freed up
        assert batcher.queue_depth == 0
        engine.release.set()
        await running
        assert engine.batches == [1]  # the timed-out request cost no compute
        await batcher.close()

    run(main())


def test_default_timeout_and_override_policy():
    async def main():
        engine = blocked_engine()
        config = batching_config(max_batch_size=4, default_timeout_us=40_000, allow_override=False)
        batcher = DynamicBatcher([engine], config)
        running = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        with pytest.raises(QueueTimeout):  # the default applies without a request timeout
            await batcher.submit({"x": rows(1, 1.0)})
        engine.release.set()
        await running
        await batcher.close()

    run(main())
    assert QueuePolicy(default_timeout_us=100).timeout_us(50) == 50
    assert QueuePolicy(default_timeout_us=100).timeout_us(500) == 100  # never lengthened
    assert QueuePolicy(default_timeout_us=100, allow_timeout_override=False).timeout_us(5) == 100
    assert QueuePolicy(allow_timeout_override=False).timeout_us(5) is None
    assert QueuePolicy().timeout_us(None) is None


def test_delay_action_moves_timed_out_requests_to_the_back():
    async def main():
        engine = blocked_engine()
        config = batching_config(max_batch_size=1, delay_on_timeout=True)
        batcher = DynamicBatcher([engine], config)
        running = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        late = asyncio.ensure_future(batcher.submit({"x": rows(1, 1.0)}, timeout_us=10_000))
        await asyncio.sleep(0.05)  # 'late' times out and is delayed, not rejected
        assert not late.done()
        fresh = asyncio.ensure_future(batcher.submit({"x": rows(1, 2.0)}))
        await until(lambda: batcher.queue_depth == 2)
        engine.release.set()
        await asyncio.gather(running, late, fresh)
        assert [float(s[0, 0]) for s in engine.seen] == [0.0, 2.0, 1.0]
        await batcher.close()

    run(main())


def test_higher_priority_is_served_first():
    async def main():
        engine = blocked_engine()
        config = batching_config(max_batch_size=1, priority_levels=3, default_priority=2)
        batcher = DynamicBatcher([engine], config)
        running = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        order = [(3, 1.0), (0, 2.0), (3, 3.0), (1, 4.0), (2, 5.0), (1, 6.0)]
        tasks = [
            asyncio.ensure_future(batcher.submit({"x": rows(1, v)}, priority=p)) for p, v in order
        ]
        await until(lambda: batcher.queue_depth == len(order))
        engine.release.set()
        await asyncio.gather(running, *tasks)
        served = [float(s[0, 0]) for s in engine.seen]
        # level 1 first (4, 6), then level 2 (default 0 -> 2: 2, then 5), then level 3
        assert served == [0.0, 4.0, 6.0, 2.0, 5.0, 1.0, 3.0]
        with pytest.raises(InvalidInput, match="priority 4 is outside"):
            await batcher.submit({"x": rows(1, 0.0)}, priority=4)
        await batcher.close()

    run(main())


def test_priorities_are_ignored_when_the_model_has_none():
    async def main():
        batcher = DynamicBatcher([FakeEngine()], batching_config(max_batch_size=2))
        outputs, _ = await batcher.submit({"x": rows(1, 1.0)}, priority=7)
        assert outputs["y"].shape == (1, 4)
        await batcher.close()

    run(main())


# ----------------------------------------------------------------- cancel, fail, close


def test_cancelled_caller_costs_no_compute():
    async def main():
        engine = blocked_engine()
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=8))
        running = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        gone = asyncio.ensure_future(batcher.submit({"x": rows(3, 9.0)}))
        kept = asyncio.ensure_future(batcher.submit({"x": rows(1, 1.0)}))
        await until(lambda: batcher.queue_depth == 2)
        gone.cancel()  # the client disconnected
        await until(lambda: batcher.queue_depth == 1)
        engine.release.set()
        await asyncio.gather(running, kept)
        assert gone.cancelled()
        assert engine.batches == [1, 1]
        assert not any((s == 9.0).any() for s in engine.seen)
        await batcher.close()

    run(main())


def test_engine_failure_fails_only_its_batch():
    async def main():
        engine = FailingEngine(poison=-1.0)
        engine.release = threading.Event()
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=8))
        first = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        poisoned = asyncio.ensure_future(batcher.submit({"x": rows(1, -1.0)}))
        neighbour = asyncio.ensure_future(batcher.submit({"x": rows(2, 1.0)}))
        await until(lambda: batcher.queue_depth == 2)
        engine.release.set()
        await first
        for task in (poisoned, neighbour):  # same batch: both fail with the engine's error
            with pytest.raises(EngineError, match="refused a batch of 3 rows"):
                await task
        outputs, _ = await batcher.submit({"x": rows(2, 5.0)})  # the batcher keeps working
        np.testing.assert_array_equal(outputs["y"], double_plus_rowsum(rows(2, 5.0)))
        await batcher.close()

    run(main())


def test_unexpected_engine_exceptions_become_engine_errors():
    def broken(x):
        raise ValueError("kaboom")

    async def main():
        batcher = DynamicBatcher([FakeEngine(broken)], batching_config(max_batch_size=2))
        with pytest.raises(EngineError, match="ValueError: kaboom") as info:
            await batcher.submit({"x": rows(1, 0.0)})
        assert info.value.status_code == 500
        await batcher.close()

    run(main())


def test_engine_input_errors_stay_client_errors():
    def picky(x):
        raise InvalidInput("values must be positive")

    async def main():
        batcher = DynamicBatcher([FakeEngine(picky)], batching_config(max_batch_size=2))
        with pytest.raises(InvalidInput, match="positive"):
            await batcher.submit({"x": rows(1, 0.0)})
        await batcher.close()

    run(main())


def test_output_without_batch_rows_is_an_engine_error():
    async def main():
        engine = blocked_engine(fn=lambda x: x.sum(keepdims=True)[0])
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=8))
        first = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        pair = [asyncio.ensure_future(batcher.submit({"x": rows(2, 1.0)})) for _ in range(2)]
        await until(lambda: batcher.queue_depth == 2)
        engine.release.set()
        await first
        for task in pair:
            with pytest.raises(EngineError, match="expected 4 rows"):
                await task
        await batcher.close()

    run(main())


def test_close_drains_queued_and_running_requests():
    async def main():
        engine = blocked_engine()
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=1), name="drain")
        tasks = [asyncio.ensure_future(batcher.submit({"x": rows(1, float(i))})) for i in range(4)]
        await until(lambda: engine.running.is_set() and batcher.queue_depth == 3)
        assert any(t.name == "batcher-drain-0" for t in threading.enumerate())
        closing = asyncio.ensure_future(batcher.close(drain_timeout_s=10))
        await asyncio.sleep(0.01)
        with pytest.raises(ServerShuttingDown):
            await batcher.submit({"x": rows(1, 0.0)})
        assert not closing.done()
        engine.release.set()
        await closing
        results = await asyncio.gather(*tasks)
        assert len(results) == 4
        assert engine.batches == [1, 1, 1, 1]
        assert batcher.in_flight == 0
        assert not engine.closed  # the owner closes engines, not the batcher
        await until(lambda: not any(t.name == "batcher-drain-0" for t in threading.enumerate()))

    run(main())


def test_close_after_the_drain_timeout_fails_what_is_left():
    async def main():
        engine = blocked_engine()
        batcher = DynamicBatcher([engine], batching_config(max_batch_size=1))
        running = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        waiting = asyncio.ensure_future(batcher.submit({"x": rows(1, 1.0)}))
        await until(lambda: batcher.queue_depth == 1)
        closing = asyncio.ensure_future(batcher.close(drain_timeout_s=0.5))
        with pytest.raises(ServerShuttingDown, match="unloaded before the request ran"):
            await waiting
        assert not closing.done()  # still waiting for the batch on the engine
        engine.release.set()
        await running  # what was already executing still finishes
        await closing
        assert batcher.in_flight == 0

    run(main())


def test_close_before_any_request():
    async def main():
        batcher = DynamicBatcher([FakeEngine()], batching_config())
        await batcher.close()
        with pytest.raises(ServerShuttingDown):
            await batcher.submit({"x": rows(1, 0.0)})

    run(main())


def test_multi_observer_fans_out():
    first, second = Recorder(), Recorder()
    MultiObserver([first, None, second]).batch_executed(3, 1, 2, 3)
    assert first.calls == second.calls == [(3, 1, 2, 3)]
    assert RequestTimings(1, 2, 3, 4, 5).batch_size == 5


def test_per_level_queue_policy():
    async def main():
        engine = blocked_engine()
        config = batching_config(max_batch_size=1, priority_levels=2, default_priority=2)
        config.dynamic_batching.priority_queue_policy[1].max_queue_size = 1
        batcher = DynamicBatcher([engine], config)
        running = asyncio.ensure_future(batcher.submit({"x": rows(1, 0.0)}))
        await until(engine.running.is_set)
        urgent = asyncio.ensure_future(batcher.submit({"x": rows(1, 1.0)}, priority=1))
        await until(lambda: batcher.queue_depth == 1)
        with pytest.raises(QueueFull, match="priority level 1"):
            await batcher.submit({"x": rows(1, 2.0)}, priority=1)
        # level 2 keeps the default (unbounded) policy
        others = [asyncio.ensure_future(batcher.submit({"x": rows(1, 3.0)})) for _ in range(3)]
        await until(lambda: batcher.queue_depth == 4)
        engine.release.set()
        await asyncio.gather(running, urgent, *others)
        await batcher.close()

    run(main())


def test_a_dispatch_bug_fails_requests_instead_of_hanging(monkeypatch):
    async def main():
        batcher = DynamicBatcher([FakeEngine()], batching_config(max_batch_size=2))

        def broken():
            raise RuntimeError("bug")

        monkeypatch.setattr(batcher, "_form_batch", broken)
        with pytest.raises(EngineError, match="batcher failed: bug"):
            await batcher.submit({"x": rows(1, 0.0)})
        monkeypatch.undo()
        outputs, _ = await batcher.submit({"x": rows(1, 1.0)})
        assert outputs["y"].shape == (1, 4)
        await batcher.close()

    run(main())


def test_a_batcher_belongs_to_one_event_loop():
    batcher = DynamicBatcher([FakeEngine()], batching_config(max_batch_size=2))
    run(batcher.submit({"x": rows(1, 0.0)}))
    with pytest.raises(RuntimeError, match="another event loop"):
        run(batcher.submit({"x": rows(1, 0.0)}))
