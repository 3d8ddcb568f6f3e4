"""The one public entry point of the optimization pipeline.

The server's job worker and the CLI call only ``run_optimization`` with an
``OptimizationRequest``; they get back an ``OptimizationResult`` naming the winning engine
and the files to publish beside it (``report.json``, ``report.png``, external data).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serving.errors import InvalidInput

TARGETS = ("cpu", "cuda", "tensorrt")
ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class OptimizationRequest:
    """What to optimize for: target device, shapes of interest, fidelity bound, budget.

    ``min_cosine`` bounds the cosine similarity of outputs to the original's;
    ``max_accuracy_drop`` bounds the drop in task accuracy (with labels) or top-1 agreement
    (without). At least one bound must be set. ``allow`` restricts the passes the search
    may use (``None``: all). ``require`` names passes the served result must contain: only
    chains holding all of them are searched, they are kept even when they time slower than
    their parent on the timing batch (the user knows the workload, e.g. padded batches for
    ``pack_padding``), and the winner is the fastest such candidate within the fidelity
    bound; the original is served only when none is (the report says why).
    ``static_shape`` compiles OpenVINO candidates for exactly the timing shape (``batch_size``
    x ``seq_len``), times them that way, and a winner's config lists that shape in the
    accelerator's ``static_shapes`` (other shapes still run, on the dynamic-shape compile).
    """

    name: str
    target: str = "cpu"
    batch_size: int = 8
    seq_len: int = 128
    min_cosine: float | None = 0.99
    max_accuracy_drop: float | None = None
    time_budget_s: float | None = None
    allow: tuple[str, ...] | None = None
    require: tuple[str, ...] | None = None
    static_shape: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidInput("name: a non-empty model name is required")
        if self.target not in TARGETS:
            raise InvalidInput(f"target: {self.target!r} is not one of {', '.join(TARGETS)}")
        for key, low, high in (("batch_size", 1, 4096), ("seq_len", 1, 65536)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidInput(f"{key}: must be an integer in [{low}, {high}], got {value!r}")
        if not isinstance(self.static_shape, bool):
            raise InvalidInput(f"static_shape: must be true or false, got {self.static_shape!r}")
        if self.min_cosine is not None and not _number_in(self.min_cosine, -1.0, 1.0):
            raise InvalidInput(f"min_cosine: must be a number in [-1, 1], got {self.min_cosine!r}")
        if self.max_accuracy_drop is not None and not _number_in(self.max_accuracy_drop, 0.0, 1.0):
            raise InvalidInput(
                f"max_accuracy_drop: must be a number in [0, 1], got {self.max_accuracy_drop!r}"
            )
        if self.min_cosine is None and self.max_accuracy_drop is None:
            raise InvalidInput("min_cosine / max_accuracy_drop: set at least one fidelity bound")
        if self.time_budget_s is not None and not _number_in(self.time_budget_s, 1.0, 7 * 86400):
            raise InvalidInput(
                f"time_budget_s: must be a number of seconds in [1, 604800], "
                f"got {self.time_budget_s!r}"
            )
        if self.allow is not None:
            if isinstance(self.allow, str) or not all(isinstance(a, str) for a in self.allow):
                raise InvalidInput("allow: must be a list of pass names")
            object.__setattr__(self, "allow", tuple(self.allow))
        if self.require is not None:
            if isinstance(self.require, str) or not all(isinstance(a, str) for a in self.require):
                raise InvalidInput("require: must be a list of pass names")
            object.__setattr__(self, "require", tuple(self.require))
            if self.allow is not None:
                missing = [name for name in self.require if name not in self.allow]
                if missing:
                    raise InvalidInput(f"require: {missing} must also be named in allow")

    def fidelity_bound(self) -> dict[str, float]:
        """The bound as a dict, for the report."""
        bound: dict[str, float] = {}
        if self.min_cosine is not None:
            bound["min_cosine"] = float(self.min_cosine)
        if self.max_accuracy_drop is not None:
            bound["max_accuracy_drop"] = float(self.max_accuracy_drop)
        return bound

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["allow"] = list(self.allow) if self.allow is not None else None
        data["require"] = list(self.require) if self.require is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizationRequest:
        """Build from JSON; unknown keys are a client mistake."""
        if not isinstance(data, dict):
            raise InvalidInput("optimization request must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(
                f"unknown optimization option(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        if "name" not in data:
            raise InvalidInput("name: a non-empty model name is required")
        values = dict(data)
        for key in ("allow", "require"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


def _number_in(value: Any, low: float, high: float) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and low <= value <= high
    )


@dataclass
class OptimizationResult:
    """The winning engine and what to publish beside it.

    ``files`` maps names relative to the version folder to files (``report.json``,
    ``report.png``, ``model.onnx.data`` when the engine has external data);
    ``original_file`` is the source as ONNX, for publishing the original as a version.
    """

    engine_file: Path
    platform: str
    files: dict[str, Path] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    original_file: Path | None = None
    original_files: dict[str, Path] = field(default_factory=dict)


def run_optimization(
    source: Path,
    request: OptimizationRequest,
    workdir: Path,
    *,
    calibration: Path | None = None,
    progress: ProgressCallback | None = None,
    cancel_event: threading.Event | None = None,
) -> OptimizationResult:
    """Load ``source``, search candidate pass chains for ``request.target``, measure them, and
    return the fastest candidate within the fidelity bound, with its report.

    ``source``: an ONNX file, a Hugging Face checkpoint folder or archive (``config.json`` +
    ``model.safetensors``), or a ``.pt2`` torch.export archive. ``calibration``: an ``.npz``
    of input tensors (optional ``labels``) or a text file, one example per line.
    Progress events: ``{"stage", "message", "fraction", "candidate"}``.
    Raises ``InvalidInput`` for bad sources/requests, ``Cancelled`` when cancelled or out of
    time before any result exists.
    """
    from optimizers.pipeline import optimize

    return optimize(
        Path(source),
        request,
        Path(workdir),
        calibration=Path(calibration) if calibration is not None else None,
        progress=progress,
        cancel_event=cancel_event,
    )
