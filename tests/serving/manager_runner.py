"""Run a real ``ModelManager`` on a repository folder for one test body."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from serving.manager import ModelManager
from serving.metrics import ServerMetrics
from serving.repository import ModelRepository
from serving.settings import Settings


def run(repo: Path, body: Callable[[ModelManager], Awaitable[Any]], **settings: Any) -> Any:
    """Start a manager on ``repo``, run ``body``, always close it."""

    async def main() -> Any:
        manager = ModelManager(
            ModelRepository(repo),
            ServerMetrics(CollectorRegistry()),
            Settings(repository=repo, drain_timeout_s=5, **settings),
        )
        await manager.start()
        await manager.wait_started()
        try:
            return await body(manager)
        finally:
            await manager.close(5)

    return asyncio.run(main())
