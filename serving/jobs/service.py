"""The job manager's lifetime inside the app: a lifespan part for ``build_app``.

Started after the serving core (it needs ``app.state.repository`` and ``app.state.models``)
and stored on ``app.state.jobs``; at shutdown running workers are stopped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from serving.jobs.manager import JobManager
from serving.jobs.worker import DEFAULT_ENTRYPOINT


def manager_from_settings(settings: Any, repository: Any, reload: Any) -> JobManager:
    """A ``JobManager`` configured from ``Settings`` (optional fields read with defaults)."""
    entrypoint = getattr(settings, "job_entrypoint", None) or os.environ.get(
        "SLIMSERVE_JOB_ENTRYPOINT", DEFAULT_ENTRYPOINT
    )
    return JobManager(
        repository,
        settings.jobs_path,
        reload=reload,
        max_concurrent=getattr(settings, "max_concurrent_jobs", 1),
        max_queued=getattr(settings, "max_queued_jobs", 16),
        max_upload_bytes=getattr(settings, "max_upload_bytes", 2 << 30),
        entrypoint=entrypoint,
        max_job_seconds=float(getattr(settings, "max_job_seconds", 6 * 3600)),
        kill_margin_s=float(os.environ.get("SLIMSERVE_JOB_KILL_MARGIN_S", "30")),
        memory_limit_bytes=getattr(settings, "job_memory_limit_bytes", None)
        or int(os.environ.get("SLIMSERVE_JOB_MEMORY_LIMIT_BYTES", "0"))
        or None,
    )


@contextlib.asynccontextmanager
async def job_service(app: Any) -> AsyncIterator[None]:
    """Lifespan part: run the job manager while the app runs (``app.state.jobs``)."""
    manager = manager_from_settings(
        app.state.settings, app.state.repository, app.state.models.reload
    )
    await manager.start()
    app.state.jobs = manager
    try:
        yield
    finally:
        app.state.jobs = None
        await manager.stop()
