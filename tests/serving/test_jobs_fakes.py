"""Entry points the job worker can run instead of the real pipeline (process-level tests).

Each has ``run_optimization``'s signature. ``copy_optimizer`` really produces a servable
ONNX engine (the source with its constant scaled by ``1 + 1e-4``, so the published version
is measurably different yet inside a cosine bound); the others misbehave in the ways a
worker can: crash, get SIGKILLed, hang ignoring SIGTERM, raise a client error.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from optimizers.api import OptimizationRequest, OptimizationResult
from serving.errors import InvalidInput

ENGINE_SCALE = 1.0001


def copy_optimizer(
    source: Path,
    request: OptimizationRequest,
    workdir: Path,
    *,
    calibration: Path | None = None,
    progress: Any = None,
    cancel_event: threading.Event | None = None,
) -> OptimizationResult:
    model = onnx.load(str(source))
    for i, step in enumerate(("load", "candidate-a", "candidate-b")):
        progress(
            {
                "stage": "search" if i else "load",
                "message": step,
                "fraction": (i + 1) / 4,
                "candidate": step if i else None,
                "passes_done": i,
                "passes_total": 3,
            }
        )
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f":
            init.CopyFrom(numpy_helper.from_array(array * ENGINE_SCALE, init.name))
    engine = workdir / "winner.onnx"
    onnx.save(model, str(engine))
    report = {
        "winner": "scale",
        "calibration": calibration.read_text()
        if calibration and calibration.suffix == ".txt"
        else None,
        "request": request.to_dict(),
    }
    (workdir / "report.json").write_text(json.dumps(report))
    (workdir / "report.png").write_bytes(b"\x89PNG fake plot")
    return OptimizationResult(
        engine_file=engine,
        platform="onnxruntime_onnx",
        files={"report.json": workdir / "report.json", "report.png": workdir / "report.png"},
        report=report,
        original_file=source,
    )


def slow_optimizer(source: Path, request: Any, workdir: Path, **kwargs: Any) -> Any:
    """Reports progress, then waits for the cancel event (cooperative cancel)."""
    progress, cancel_event = kwargs["progress"], kwargs["cancel_event"]
    progress({"stage": "search", "message": "waiting", "fraction": 0.5, "candidate": "slow"})
    while not cancel_event.is_set():
        time.sleep(0.05)
    raise RuntimeError("stopped")  # the worker reports it as cancelled (the event is set)


def stubborn_optimizer(source: Path, request: Any, workdir: Path, **kwargs: Any) -> Any:
    """Ignores SIGTERM and never finishes: only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kwargs["progress"]({"stage": "search", "message": "stuck", "fraction": 0.1})
    while True:
        time.sleep(0.1)


def sigkill_optimizer(source: Path, request: Any, workdir: Path, **kwargs: Any) -> Any:
    """Dies of SIGKILL mid-search (as under the OOM killer)."""
    kwargs["progress"]({"stage": "search", "message": "about to die", "fraction": 0.3})
    (workdir / "half-written.onnx").write_bytes(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def exit_optimizer(source: Path, request: Any, workdir: Path, **kwargs: Any) -> Any:
    print("native crash imminent", flush=True)
    os._exit(7)


def invalid_optimizer(source: Path, request: Any, workdir: Path, **kwargs: Any) -> Any:
    raise InvalidInput("the model has no inputs the pipeline can feed")


def bad_platform_optimizer(source: Path, request: Any, workdir: Path, **kwargs: Any) -> Any:
    result = copy_optimizer(source, request, workdir, **kwargs)
    result.platform = "pytorch_libtorch"
    return result


def hungry_optimizer(source: Path, request: Any, workdir: Path, **kwargs: Any) -> Any:
    """Allocates far more memory than the worker is allowed."""
    kwargs["progress"]({"stage": "search", "message": "allocating", "fraction": 0.2})
    blocks = [bytearray(256 << 20) for _ in range(64)]  # 16 GiB
    return len(blocks)


def out_of_time_optimizer(source: Path, request: Any, workdir: Path, **kwargs: Any) -> Any:
    """The pipeline's own deadline passed before any candidate was done."""
    from optimizers.passes.base import Cancelled

    raise Cancelled("time budget exhausted")
