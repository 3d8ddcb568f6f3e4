"""The optimization worker process: ``python -m serving.jobs.worker <job dir>``.

Runs one job in its own process so a crash, an out-of-memory kill or a hung pass can never
take the server down. Reads ``spec.json``, calls the pipeline's public entry point
(``optimizers.api.run_optimization`` unless the spec names another ``module:function``),
appends progress events to ``progress.jsonl`` (one JSON object per line) and ends by writing
``result.json`` (exit 0) or ``error.json`` (exit 1, or 3 when cancelled). SIGTERM asks the
pipeline to stop at its next check; the worker also exits when the server process is gone.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from serving.fileutil import atomic_write_text

logger = logging.getLogger("slimserve.worker")

SPEC_FILE = "spec.json"
PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
LOG_FILE = "worker.log"
DEFAULT_ENTRYPOINT = "optimizers.api:run_optimization"
EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_ORPHANED = 0, 1, 3, 4


def resolve_entrypoint(spec: str) -> Any:
    """The callable named by ``"package.module:function"``."""
    module_name, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module_name), attribute or "run_optimization")


def result_to_json(result: Any) -> dict[str, Any]:
    """An ``OptimizationResult`` as JSON-able data (paths as absolute strings)."""

    def path(value: Any) -> str | None:
        return str(Path(value).resolve()) if value is not None else None

    return {
        "engine_file": path(result.engine_file),
        "platform": result.platform,
        "files": {name: path(p) for name, p in (result.files or {}).items()},
        "report": result.report or {},
        "original_file": path(getattr(result, "original_file", None)),
        "original_files": {
            name: path(p) for name, p in (getattr(result, "original_files", None) or {}).items()
        },
    }


class ProgressWriter:
    """Appends progress events to ``progress.jsonl`` (flushed per line) and logs them."""

    def __init__(self, path: Path) -> None:
        self._handle = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        event = {**event, "time": time.time()}
        line = json.dumps(event, default=str)
        with self._lock:
            self._handle.write(line + "\n")
            self._handle.flush()
        fraction = event.get("fraction")
        done = f" ({fraction:.0%})" if isinstance(fraction, int | float) else ""
        logger.info("%s: %s%s", event.get("stage", "?"), event.get("message", ""), done)

    def close(self) -> None:
        self._handle.close()


def harden_torch_load() -> None:
    """Make every ``torch.load`` in this process weights-only.

    ``torch.export.load`` retries some loads with ``weights_only=False``; the server has
    already refused ``.pt2`` files whose pickles name unsafe globals, and this keeps a pickle
    that slipped past that check from running code here.
    """
    import torch

    original = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = weights_only_load


def limit_resources(memory_limit_bytes: int | None) -> None:
    """Make this process the OOM killer's first choice, and cap its address space if asked.

    With a cap, running out of memory is a ``MemoryError`` the job reports instead of a
    kill that could also hit the server.
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")
    if memory_limit_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))


def _watch_parent(parent: int) -> None:
    """Exit when the server that started us is gone (its job is failed on restart)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            logger.error("server process %d is gone; stopping", parent)
            os._exit(EXIT_ORPHANED)


def run(job_dir: Path) -> int:
    """Run the job in ``job_dir``; returns the process exit code."""
    spec = json.loads((job_dir / SPEC_FILE).read_text(encoding="utf-8"))
    cancel = threading.Event()

    def on_sigterm(_signum: int, _frame: Any) -> None:
        logger.warning("cancel requested (SIGTERM)")
        cancel.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    parent = spec.get("parent_pid")
    if parent:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    progress = ProgressWriter(job_dir / PROGRESS_FILE)
    try:
        limit_resources(spec.get("memory_limit_bytes"))
        from optimizers.api import OptimizationRequest

        request = OptimizationRequest.from_dict(spec["request"])
        if spec.get("kind") == "pt2":
            harden_torch_load()
        entrypoint = resolve_entrypoint(spec.get("entrypoint") or DEFAULT_ENTRYPOINT)
        workdir = Path(spec["workdir"])
        workdir.mkdir(parents=True, exist_ok=True)
        calibration = spec.get("calibration")
        name = Path(spec["source"]).name
        progress({"stage": "start", "message": f"optimizing {name}", "fraction": 0.0})
        result = entrypoint(
            Path(spec["source"]),
            request,
            workdir,
            calibration=Path(calibration) if calibration else None,
            progress=progress,
            cancel_event=cancel,
        )
        data = result_to_json(result)
    except BaseException as exc:
        cancelled = cancel.is_set()  # a pipeline out of time is a failure, not a cancel
        message = str(exc) or type(exc).__name__
        error = message if cancelled else f"{type(exc).__name__}: {message}"
        logger.error("job failed: %s\n%s", error, traceback.format_exc())
        atomic_write_text(
            job_dir / ERROR_FILE,
            json.dumps(
                {
                    "error": error,
                    "type": type(exc).__name__,
                    "cancelled": cancelled,
                    "client_error": getattr(exc, "status_code", 500) < 500,
                }
            ),
        )
        return EXIT_CANCELLED if cancelled else EXIT_FAILED
    finally:
        progress.close()
    atomic_write_text(job_dir / RESULT_FILE, json.dumps(data, indent=1, default=str))
    logger.info("done: %s (%s)", data["engine_file"], data["platform"])
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m serving.jobs.worker <job dir>", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(Path(args[0]).resolve())


if __name__ == "__main__":
    sys.exit(main())
