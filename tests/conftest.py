"""Shared fixtures: small test repositories and real server processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.server import RemoteServer
from tests.models import basic_repository


@pytest.fixture
def basic_repo(tmp_path: Path) -> Path:
    """A fresh repository with ``add_sub`` and ``all_types``."""
    return basic_repository(tmp_path / "repository")


@pytest.fixture
def start_server() -> Iterator[Callable[..., RemoteServer]]:
    """Start ``RemoteServer(repository, *args, **options)``; every one is stopped at teardown."""
    servers: list[RemoteServer] = []

    def start(repository: Path, *args: str, **options) -> RemoteServer:
        server = RemoteServer(repository, *args, **options)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.__exit__(None, None, None)
