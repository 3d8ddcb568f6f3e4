"""The engine protocol every runtime implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc


@dataclass(frozen=True)
class TensorSpec:
    """Name, v2 datatype and full shape (``-1`` for dynamic, batch dim included)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@runtime_checkable
class Engine(Protocol):
    """A loaded model version that runs one batch at a time on one executor.

    ``infer`` is synchronous and thread-safe for the instances it was created for; the
    server calls it from worker threads, never on the event loop.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    device: str

    def infer(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch; returns the requested outputs (all when ``output_names`` is None)."""
        ...

    def close(self) -> None:
        """Release the runtime's resources."""
        ...


class EngineLoader(Protocol):
    def __call__(self, model_file: Path, config: mc.ModelConfig) -> Engine: ...
