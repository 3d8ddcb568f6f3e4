"""Small fake engines for unit tests (real numpy arithmetic, no runtime)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.backends.base import TensorSpec
from serving.errors import EngineError


class FakeEngine:
    """Applies ``fn`` to input ``x`` and records every batch it ran.

    Default ``fn``: ``y = x * 2 + rowsum(x)``, so a row mixed up with another caller's
    row, or split at the wrong place, gives a different answer.
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray] | None = None,
        *,
        width: int = 4,
        delay_s: float = 0.0,
        datatype: str = "FP32",
    ) -> None:
        self.fn = fn or double_plus_rowsum
        self.delay_s = delay_s
        self.inputs = [TensorSpec("x", datatype, (-1, width))]
        self.outputs = [TensorSpec("y", datatype, (-1, width)), TensorSpec("n", "INT64", (-1, 1))]
        self.device = "cpu"
        self.batches: list[int] = []  # rows per executed batch
        self.seen: list[np.ndarray] = []  # the input of every batch, in execution order
        self.calls = 0
        self.closed = False
        self.running = threading.Event()  # set while infer() runs
        self.release: threading.Event | None = None  # when set, infer() waits for it
        self._lock = threading.Lock()

    def infer(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self._lock:
            self.calls += 1
            self.batches.append(int(x.shape[0]))
            self.seen.append(np.array(x))
        self.running.set()
        try:
            if self.release is not None:
                self.release.wait(10)
            if self.delay_s:
                time.sleep(self.delay_s)
            out = {
                "y": self.fn(x),
                "n": np.full((x.shape[0], 1), x.shape[0], dtype=np.int64),
            }
        finally:
            self.running.clear()
        names = output_names or ["y", "n"]
        return {name: out[name] for name in names}

    def close(self) -> None:
        self.closed = True


class FailingEngine(FakeEngine):
    """Fails every batch whose input contains ``poison`` (or every batch when None)."""

    def __init__(self, poison: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.poison = poison

    def infer(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if self.poison is None or bool((x == self.poison).any()):
            with self._lock:
                self.calls += 1
                self.batches.append(int(x.shape[0]))
            raise EngineError(f"fake engine refused a batch of {x.shape[0]} rows")
        return super().infer(inputs, output_names)


def double_plus_rowsum(x: np.ndarray) -> np.ndarray:
    """``x * 2 + x.sum(axis=1)`` row by row."""
    return x * 2 + x.sum(axis=1, keepdims=True)


def batching_config(
    *,
    max_batch_size: int = 8,
    dynamic: bool = True,
    delay_us: int = 0,
    preferred: tuple[int, ...] = (),
    priority_levels: int = 0,
    default_priority: int = 0,
    max_queue_size: int = 0,
    default_timeout_us: int = 0,
    allow_override: bool = True,
    delay_on_timeout: bool = False,
    instances: int = 1,
) -> mc.ModelConfig:
    """A ModelConfig for the fake engines with the batching knobs set."""
    config = mc.ModelConfig(name="fake", max_batch_size=max_batch_size)
    config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    if dynamic:
        dyn = config.dynamic_batching
        dyn.max_queue_delay_microseconds = delay_us
        dyn.preferred_batch_size.extend(preferred)
        dyn.priority_levels = priority_levels
        dyn.default_priority_level = default_priority
        if max_queue_size or default_timeout_us or not allow_override or delay_on_timeout:
            policy = dyn.default_queue_policy
            policy.max_queue_size = max_queue_size
            policy.default_timeout_microseconds = default_timeout_us
            policy.allow_timeout_override = allow_override
            policy.timeout_action = (
                mc.ModelQueuePolicy.DELAY if delay_on_timeout else mc.ModelQueuePolicy.REJECT
            )
        else:
            dyn.SetInParent()
    return config


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition()`` on the event loop until it holds (AssertionError after timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)
