"""Dynamic batching: one ``DynamicBatcher`` per loaded model version.

Requests wait in per-priority FIFO queues. One dispatcher task on the event loop forms
batches (requests whose non-batch shapes and dtypes match are concatenated along dim 0)
and hands each to an idle model instance; every instance runs its batches on its own
worker thread, so N instances run N batches in parallel. When several instances are idle, a
batch takes at most its share of the waiting rows (rows / idle instances), so one instance
does not take them all while the others idle; a batch capped at its share still waits out
``max_queue_delay`` for companions, like any batch that is not full. Behaviour follows the model's
``config.pbtxt`` (``max_batch_size``, ``dynamic_batching``, priorities and queue
policies), as Triton's dynamic batcher does.

Nothing is padded unless the config marks the model variable-length (``serving.ragged``):
then requests that differ only in sequence length share a batch, padded to its longest and
trimmed back per caller, and when more wait than fit, the batch is the window of similar
lengths (always holding the oldest request) that computes the least padding.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import queue as queue_module
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.backends.base import Engine
from serving.errors import (
    EngineError,
    InvalidInput,
    QueueFull,
    QueueTimeout,
    ServerShuttingDown,
    SlimServeError,
)
from serving.ragged import RaggedSpec

log = logging.getLogger(__name__)

_now = time.perf_counter_ns
_QUEUED, _TAKEN, _GONE = 0, 1, 2
GROUP_SCAN = 256  # length grouping picks among this many of the oldest waiting requests


@dataclass
class RequestTimings:
    """Where one request's time went, in nanoseconds, and the size of its batch (rows)."""

    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int
    batch_size: int


class BatchObserver(Protocol):
    def batch_executed(
        self, batch_size: int, compute_input_ns: int, compute_infer_ns: int, compute_output_ns: int
    ) -> None:
        """Called once per successfully executed batch (from a worker thread)."""
        ...


class PaddingObserver(Protocol):
    def batch_padding(self, real_tokens: int, computed_tokens: int) -> None:
        """Called once per executed batch of a variable-length model (optional method)."""
        ...


class MultiObserver:
    """Fans ``batch_executed`` (and ``batch_padding``) out to several observers."""

    def __init__(self, observers: Iterable[BatchObserver | None]) -> None:
        self.observers = [o for o in observers if o is not None]

    def batch_executed(
        self, batch_size: int, compute_input_ns: int, compute_infer_ns: int, compute_output_ns: int
    ) -> None:
        for observer in self.observers:
            observer.batch_executed(
                batch_size, compute_input_ns, compute_infer_ns, compute_output_ns
            )

    def batch_padding(self, real_tokens: int, computed_tokens: int) -> None:
        for observer in self.observers:
            report = getattr(observer, "batch_padding", None)
            if report is not None:
                report(real_tokens, computed_tokens)


@dataclass(frozen=True)
class QueuePolicy:
    """One priority level's queue policy (Triton's ``ModelQueuePolicy``)."""

    delay_on_timeout: bool = False  # timeout_action DELAY instead of REJECT
    default_timeout_us: int = 0  # 0 = none
    allow_timeout_override: bool = True
    max_queue_size: int = 0  # 0 = unbounded

    @classmethod
    def from_proto(cls, policy: mc.ModelQueuePolicy) -> QueuePolicy:
        return cls(
            delay_on_timeout=policy.timeout_action == mc.ModelQueuePolicy.DELAY,
            default_timeout_us=int(policy.default_timeout_microseconds),
            allow_timeout_override=bool(policy.allow_timeout_override),
            max_queue_size=int(policy.max_queue_size),
        )

    def timeout_us(self, requested: int | None) -> int | None:
        """The effective queue timeout: a request may shorten, never lengthen, the default."""
        default = self.default_timeout_us or None
        if requested and self.allow_timeout_override:
            return requested if default is None else min(default, requested)
        return default


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    output_names: list[str] | None
    rows: int
    signature: tuple
    level: int
    future: asyncio.Future
    enqueue_ns: int
    state: int = _QUEUED
    timer: asyncio.TimerHandle | None = None
    queue: deque | None = field(default=None, repr=False)
    length: int = 0  # sequence length (variable-length models only)


class DynamicBatcher:
    """Queues requests for one model version and runs them in batches on its instances.

    ``engines`` holds one engine per instance. The batcher does not close the engines:
    their owner does, after ``close()``.
    """

    def __init__(
        self,
        engines: list[Engine],
        config: mc.ModelConfig,
        *,
        observer: BatchObserver | None = None,
        name: str = "",
        max_scan: int = 1024,
        isolate_failures: bool = False,
    ) -> None:
        """``isolate_failures``: when the engine raises on a batch of several requests, run
        each alone so that only the requests failing by themselves get the error."""
        if not engines:
            raise ValueError("a DynamicBatcher needs at least one engine")
        self.engines = list(engines)
        self.name = name or config.name or "model"
        self.observer = observer
        self.isolate_failures = isolate_failures
        self.max_batch_size = int(config.max_batch_size)
        self.batching = self.max_batch_size > 0 and config.HasField("dynamic_batching")
        dyn = config.dynamic_batching
        self.max_queue_delay_ns = int(dyn.max_queue_delay_microseconds) * 1000
        self.preferred = sorted(
            {int(p) for p in dyn.preferred_batch_size if 0 < p <= self.max_batch_size}
        )
        self.priority_levels = int(dyn.priority_levels)
        default_level = int(dyn.default_priority_level) or max(1, self.priority_levels)
        self.default_level = min(default_level, max(1, self.priority_levels))
        levels = max(1, self.priority_levels)
        explicit = config.HasField("dynamic_batching") and dyn.HasField("default_queue_policy")
        default_policy = QueuePolicy.from_proto(dyn.default_queue_policy) if explicit else None
        self.policies: dict[int, QueuePolicy] = {}
        for level in range(1, levels + 1):
            if level in dyn.priority_queue_policy:
                self.policies[level] = QueuePolicy.from_proto(dyn.priority_queue_policy[level])
            else:
                self.policies[level] = default_policy or QueuePolicy()
        # levels 1..N in order, then one extra level for requests delayed by a timeout.
        self._queues: list[deque[_Pending]] = [deque() for _ in range(levels + 1)]
        self._delayed_level = levels + 1
        self._output_names = {spec.name for spec in self.engines[0].outputs}
        self.ragged = RaggedSpec.from_config(
            config, [spec.name for spec in self.engines[0].inputs], self._output_names
        )
        self._max_scan = max_scan
        self._queued = 0
        self._queued_rows = 0
        self._executing = 0
        self._closing = False
        self._idle: list[int] = list(range(len(self.engines)))
        self._workers: list[queue_module.SimpleQueue] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: asyncio.Task | None = None
        self._changed: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._delay_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ public API

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Requests waiting or executing."""
        return self._queued + self._executing

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        *,
        output_names: list[str] | None = None,
        priority: int = 0,
        timeout_us: int | None = None,
    ) -> tuple[dict[str, np.ndarray], RequestTimings]:
        """Queue one request and wait for its outputs (only its own rows)."""
        if self._closing:
            raise ServerShuttingDown(f"model '{self.name}' is unloading; no new requests")
        if self._loop is None:
            self._start()
        elif asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(f"the batcher of '{self.name}' belongs to another event loop")
        level = self._level(priority)
        rows, signature = self._describe(inputs)
        length = self.ragged.length(inputs) if self.ragged is not None else 0
        if output_names is not None:
            unknown = [n for n in output_names if n not in self._output_names]
            if unknown:
                known = ", ".join(sorted(self._output_names))
                raise InvalidInput(
                    f"model '{self.name}' has no output(s) {', '.join(unknown)}; "
                    f"its outputs are {known}"
                )
        policy = self.policies[level]
        queue = self._queues[level - 1]
        if policy.max_queue_size and len(queue) >= policy.max_queue_size:
            raise QueueFull(
                f"model '{self.name}' has {len(queue)} requests waiting at priority level "
                f"{level} (max_queue_size {policy.max_queue_size}); retry later"
            )
        loop = self._loop
        assert loop is not None
        pending = _Pending(
            inputs, output_names, rows, signature, level, loop.create_future(), _now()
        )
        pending.queue = queue
        pending.length = length
        queue.append(pending)
        self._queued += 1
        self._queued_rows += rows
        timeout = policy.timeout_us(timeout_us)
        if timeout:
            pending.timer = loop.call_later(timeout / 1e6, self._timed_out, pending, policy)
        if self._idle:  # otherwise the next finished batch wakes the dispatcher
            self._changed.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            if pending.state == _QUEUED:
                self._remove(pending)
            raise

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting requests; finish queued and running ones (up to the timeout)."""
        self._closing = True
        if self._loop is None:
            return
        self._changed.set()
        if self.in_flight:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), drain_timeout_s)
        self._fail_queued(
            ServerShuttingDown(f"model '{self.name}' unloaded before the request ran")
        )
        if self._executing:
            # Batches already on an engine cannot be interrupted; give them as long again,
            # so the owner does not close an engine under a running batch.
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), drain_timeout_s)
            if self._executing:
                log.warning(
                    "model '%s': %d request(s) still executing after close",
                    self.name,
                    self._executing,
                )
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for work in self._workers:
            work.put(None)  # the thread exits after its current batch

    # ---------------------------------------------------------------- submission

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._drained = asyncio.Event()
        for index, engine in enumerate(self.engines):
            work: queue_module.SimpleQueue = queue_module.SimpleQueue()
            thread = threading.Thread(
                target=self._worker,
                args=(index, engine, work, self._loop),
                name=f"batcher-{self.name}-{index}",
                daemon=True,
            )
            thread.start()
            self._workers.append(work)
        self._dispatcher = self._loop.create_task(self._dispatch_loop())

    def _level(self, priority: int) -> int:
        if self.priority_levels == 0:
            return 1
        if priority == 0:
            return self.default_level
        if not 1 <= priority <= self.priority_levels:
            raise InvalidInput(
                f"priority {priority} is outside model '{self.name}''s levels 1 (highest) to "
                f"{self.priority_levels}; use 0 for the default"
            )
        return priority

    def _describe(self, inputs: dict[str, np.ndarray]) -> tuple[int, tuple]:
        if not inputs:
            raise InvalidInput("a request needs at least one input")
        if self.max_batch_size <= 0:
            return 1, ()
        rows = None
        signature = []
        for name, array in inputs.items():
            if array.ndim == 0:
                raise InvalidInput(f"input '{name}' has no batch dimension")
            if rows is None:
                rows = array.shape[0]
            elif array.shape[0] != rows:
                raise InvalidInput(
                    f"inputs disagree on the batch size ({rows} vs {array.shape[0]} for '{name}')"
                )
            shape = self.ragged.shape_key(name, array.shape) if self.ragged else array.shape[1:]
            signature.append((name, array.dtype.str, shape))
        assert rows is not None
        if not 1 <= rows <= self.max_batch_size:
            raise InvalidInput(
                f"batch size {rows} is outside 1..{self.max_batch_size} "
                f"(model '{self.name}''s max_batch_size)"
            )
        signature.sort()
        return rows, tuple(signature)

    def _remove(self, pending: _Pending) -> None:
        """Take a still-queued request out of its queue (timeout, cancel, shutdown)."""
        if pending.state != _QUEUED:
            return
        pending.state = _GONE
        if pending.timer is not None:
            pending.timer.cancel()
        with contextlib.suppress(ValueError):
            pending.queue.remove(pending)
        self._queued -= 1
        self._queued_rows -= pending.rows
        self._check_drained()

    def _fail_queued(self, error: Exception) -> None:
        for queue in self._queues:
            for pending in list(queue):
                self._remove(pending)
                if not pending.future.done():
                    pending.future.set_exception(error)

    def _timed_out(self, pending: _Pending, policy: QueuePolicy) -> None:
        if pending.state != _QUEUED:
            return
        if policy.delay_on_timeout:
            pending.timer = None
            pending.queue.remove(pending)
            pending.queue = self._queues[self._delayed_level - 1]
            pending.queue.append(pending)
            return
        self._remove(pending)
        if not pending.future.done():
            waited_us = (_now() - pending.enqueue_ns) // 1000
            pending.future.set_exception(
                QueueTimeout(
                    f"request to model '{self.name}' timed out after waiting {waited_us} us "
                    "in the queue"
                )
            )

    def _check_drained(self) -> None:
        if self._queued == 0 and self._executing == 0 and self._drained is not None:
            self._drained.set()

    # ------------------------------------------------------------------ dispatch

    async def _dispatch_loop(self) -> None:
        changed = self._changed
        while True:
            changed.clear()
            if self._idle and self._queued:
                try:
                    batch, wait_until = self._form_batch()
                    if batch:
                        self._launch(batch)
                        continue
                except Exception as exc:  # a bug here must not leave callers waiting forever
                    log.exception("model '%s': the batcher failed to dispatch", self.name)
                    self._fail_queued(EngineError(f"model '{self.name}' batcher failed: {exc}"))
                    continue
                if wait_until is not None:
                    if self._delay_timer is not None:
                        self._delay_timer.cancel()
                    delay = max(0.0, (wait_until - _now()) / 1e9)
                    self._delay_timer = self._loop.call_later(delay, changed.set)
            await changed.wait()

    def _form_batch(self) -> tuple[list[_Pending], int | None]:
        """The next batch, or ([], time to re-check) while waiting for more rows."""
        head = None
        for queue in self._queues:
            if queue:
                head = queue[0]
                break
        if head is None:
            return [], None
        if not self.batching:
            return [head], None
        limit = self.max_batch_size
        idle = len(self._idle)
        if idle > 1:
            # several instances wait: share the rows out instead of one taking them all
            limit = min(limit, max(head.rows, -(-self._queued_rows // idle)))
        batch: list[_Pending] = []
        rows = 0
        preferred_cut = 0  # length of the longest prefix whose rows hit a preferred size
        scanned = 0
        stop = False  # the batch takes no more rows (limit or scan reached)
        cut: deque[_Pending] | None = None  # the queue where the rows stopped fitting
        for queue in self._queues:
            for pending in queue:
                scanned += 1
                if pending.signature != head.signature:
                    continue
                if rows + pending.rows > limit:
                    stop, cut = True, queue
                    break
                batch.append(pending)
                rows += pending.rows
                if rows in self.preferred:
                    preferred_cut = len(batch)
                if rows == limit or scanned >= self._max_scan:
                    stop = True
                    cut = queue if rows == limit else None
                    break
            if stop:
                break
        # a batch capped at its share is not full: more rows may still come within the delay
        full = stop and (limit == self.max_batch_size or scanned >= self._max_scan)
        deadline = head.enqueue_ns + self.max_queue_delay_ns
        if full or self._closing or self.max_queue_delay_ns == 0 or _now() >= deadline:
            if cut is not None and self.ragged is not None and self.ragged.group_lengths:
                return self._group_lengths(head, batch, cut, limit), None
            return batch, None
        if preferred_cut:
            return batch[:preferred_cut], None
        return [], deadline

    def _group_lengths(
        self, head: _Pending, fifo: list[_Pending], cut: deque[_Pending], limit: int
    ) -> list[_Pending]:
        """More requests wait than fit: the batch of similar lengths with the least padding.

        ``fifo`` is the batch first-come order would take (at most ``limit`` rows) and
        ``cut`` the queue (priority level) where it ran out of room. Levels before ``cut``
        stay whole (priorities hold); from ``cut``, the requests that join are a window of
        neighbouring lengths instead of the earliest ones. The head (oldest request of the
        highest level) is always in the batch, so no request waits forever.
        """
        fixed = [p for p in fifo if p.queue is not cut]
        if head.queue is cut:
            fixed.append(head)
        room = limit - sum(p.rows for p in fixed)
        pool: list[_Pending] = []
        for index, pending in enumerate(cut):
            if index >= min(self._max_scan, GROUP_SCAN):
                break
            if pending is not head and pending.signature == head.signature and pending.rows <= room:
                pool.append(pending)
        if not pool or room <= 0:
            return fifo
        pool.sort(key=lambda p: (p.length, p.enqueue_ns))
        fixed_rows = sum(p.rows for p in fixed)
        fixed_tokens = sum(p.rows * p.length for p in fixed)
        fixed_width = max((p.length for p in fixed), default=0)
        # prefix sums over the sorted pool: each window (pool[start:end], filled while rows
        # fit) costs O(log n)
        row_sums = list(itertools.accumulate((p.rows for p in pool), initial=0))
        token_sums = list(itertools.accumulate((p.rows * p.length for p in pool), initial=0))
        age_sums = list(itertools.accumulate((p.enqueue_ns for p in pool), initial=0))
        best: tuple[int, int, int] | None = None
        best_start = best_end = 0
        for start in range(len(pool)):
            end = bisect.bisect_right(row_sums, row_sums[start] + room, lo=start + 1) - 1
            rows = fixed_rows + row_sums[end] - row_sums[start]
            width = max(fixed_width, pool[end - 1].length)
            padding = rows * width - fixed_tokens - (token_sums[end] - token_sums[start])
            # fullest batch first, then least padding, then the longest-waiting requests
            key = (-rows, padding, age_sums[end] - age_sums[start])
            if best is None or key < best:
                best, best_start, best_end = key, start, end
        return fixed + pool[best_start:best_end]

    def _launch_ready(self) -> None:
        """Launch the batches that can go now; the dispatcher handles delays and errors."""
        try:
            while self._idle and self._queued:
                batch, _ = self._form_batch()
                if not batch:
                    return
                self._launch(batch)
        except Exception:  # the dispatcher meets it again and fails the queued requests
            return

    def _launch(self, batch: list[_Pending]) -> None:
        instance = self._idle.pop()
        for pending in batch:
            pending.state = _TAKEN
            if pending.timer is not None:
                pending.timer.cancel()
            self._take(pending)
        self._queued -= len(batch)
        self._queued_rows -= sum(p.rows for p in batch)
        self._executing += len(batch)
        self._workers[instance].put(batch)

    @staticmethod
    def _take(pending: _Pending) -> None:
        queue = pending.queue
        if queue[0] is pending:
            queue.popleft()
        else:
            queue.remove(pending)

    def _finish(self, instance: int, batch: list[_Pending], results: Any) -> None:
        """Back on the event loop: free the instance, start the next batch, then hand each
        caller its result.

        The next batch goes first: the callers' responses are encoded and written on this
        loop (several ms for a batch of 16), and the instance would sit idle meanwhile.
        """
        self._idle.append(instance)
        self._executing -= len(batch)
        self._launch_ready()
        if isinstance(results, BaseException):
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(_copy_error(results))
        else:
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
        self._check_drained()
        self._changed.set()

    # ----------------------------------------------------------------- execution

    def _worker(
        self,
        instance: int,
        engine: Engine,
        work: queue_module.SimpleQueue,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """One thread per instance: run the batches it is given, report to the loop.

        A plain thread with a queue and ``call_soon_threadsafe`` costs about a third of
        ``run_in_executor``'s hand-off, which matters for small overhead-bound models.
        """
        while True:
            batch = work.get()
            if batch is None:
                return
            results = self._execute(engine, batch)
            try:
                loop.call_soon_threadsafe(self._finish, instance, batch, results)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                return

    def _execute(
        self, engine: Engine, batch: list[_Pending]
    ) -> list[tuple[dict[str, np.ndarray], RequestTimings] | BaseException] | BaseException:
        """Runs on the instance's worker thread: concatenate, infer, split.

        When the engine fails on a batch of several requests, each is run again alone, so
        only the requests that fail by themselves get the error.
        """
        try:
            return list(self._run_batch(engine, batch))
        except _InferFailed as failed:
            error = self._engine_error(failed.error)
            if len(batch) == 1 or not self.isolate_failures or not isinstance(error, EngineError):
                return error
            log.warning(
                "model '%s' failed on a batch of %d requests; running them one by one: %s",
                self.name, len(batch), error,
            )  # fmt: skip
        except Exception as exc:
            return self._engine_error(exc)
        results: list[tuple[dict[str, np.ndarray], RequestTimings] | BaseException] = []
        for pending in batch:
            try:
                results.extend(self._run_batch(engine, [pending]))
            except _InferFailed as failed:
                results.append(self._engine_error(failed.error))
            except Exception as exc:
                results.append(self._engine_error(exc))
        return results

    def _engine_error(self, exc: Exception) -> SlimServeError:
        """``exc`` as the error its caller gets (unknown exceptions logged, then a 500)."""
        if isinstance(exc, SlimServeError):
            return exc
        log.error("model '%s' failed", self.name, exc_info=exc)
        return EngineError(f"model '{self.name}' failed: {type(exc).__name__}: {exc}")

    def _run_batch(
        self, engine: Engine, batch: list[_Pending]
    ) -> list[tuple[dict[str, np.ndarray], RequestTimings]]:
        start = _now()
        ragged = self.ragged
        width = max(p.length for p in batch)
        if len(batch) == 1:
            inputs = batch[0].inputs
        elif ragged is not None:
            inputs = {
                name: ragged.merge(name, [p.inputs[name] for p in batch], width)
                for name in batch[0].inputs
            }
        else:
            inputs = {
                name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs
            }
        names = _union_outputs(batch)
        t_input = _now()
        try:
            outputs = engine.infer(inputs, names)
        except Exception as exc:  # the engine itself failed (not the split below)
            raise _InferFailed(exc) from exc
        t_infer = _now()
        total = sum(p.rows for p in batch)
        if len(batch) == 1:
            parts = [outputs]
        else:
            cuts = np.cumsum([p.rows for p in batch])[:-1]
            split: dict[str, list[np.ndarray]] = {}
            for name, array in outputs.items():
                if array.ndim == 0 or array.shape[0] != total:
                    raise EngineError(
                        f"model '{self.name}' output '{name}' has shape {list(array.shape)}; "
                        f"expected {total} rows for the batch"
                    )
                split[name] = np.split(array, cuts)
                if ragged is not None and name in ragged.outputs:
                    if array.ndim < 2 or array.shape[1] != width:
                        raise EngineError(
                            f"model '{self.name}' output '{name}' has shape "
                            f"{list(array.shape)}; expected sequence length {width} on axis 1"
                        )
                    split[name] = [
                        ragged.trim(name, piece, p.length)
                        for piece, p in zip(split[name], batch, strict=True)
                    ]
            parts = [{name: pieces[i] for name, pieces in split.items()} for i in range(len(batch))]
        results = []
        for pending, part in zip(batch, parts, strict=True):
            if pending.output_names is not None:
                part = {name: part[name] for name in pending.output_names}
            results.append(part)
        end = _now()
        ci, cf, co = t_input - start, t_infer - t_input, end - t_infer
        if self.observer is not None:
            try:
                self.observer.batch_executed(total, ci, cf, co)
                padding = getattr(self.observer, "batch_padding", None)
                if ragged is not None and padding is not None:
                    padding(sum(p.rows * p.length for p in batch), total * width)
            except Exception:
                log.exception("batch observer of model '%s' failed", self.name)
        return [
            (part, RequestTimings(start - p.enqueue_ns, ci, cf, co, total))
            for p, part in zip(batch, results, strict=True)
        ]


class _InferFailed(Exception):
    """``engine.infer`` raised ``error`` (told apart from failures around it)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _union_outputs(batch: list[_Pending]) -> list[str] | None:
    names: dict[str, None] = {}
    for pending in batch:
        if pending.output_names is None:
            return None
        names.update(dict.fromkeys(pending.output_names))
    return list(names)


def _copy_error(error: BaseException) -> BaseException:
    """One exception object per caller, so their tracebacks do not pile up on one."""
    if isinstance(error, SlimServeError):
        try:
            return type(error)(error.message)
        except Exception:
            return error
    return error
