"""The infer hot path's raw-ASGI helpers: header picking, body reading, app placement."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi import FastAPI

from serving.app import build_server_app
from serving.errors import PayloadTooLarge
from serving.routers.infer import ClientDisconnected, InferFastPath, InferHeaders, read_body
from serving.settings import Settings


def _receiver(messages: list[dict]):
    queue = list(messages)

    async def receive() -> dict:
        return queue.pop(0)

    return receive


def test_headers_are_picked_case_insensitively_and_others_ignored() -> None:
    scope = {
        "headers": [
            (b"Content-Length", b"12"),
            (b"inference-header-content-length", b"7"),
            (b"ACCEPT-ENCODING", b"gzip"),
            (b"x-other", b"1"),
        ]
    }
    headers = InferHeaders.from_scope(scope)
    assert headers == InferHeaders(
        content_length="12", content_encoding=None, header_length="7", accept_encoding="gzip"
    )


def test_read_body_joins_chunks() -> None:
    receive = _receiver(
        [
            {"type": "http.request", "body": b"ab", "more_body": True},
            {"type": "http.request", "body": b"", "more_body": True},
            {"type": "http.request", "body": b"cd", "more_body": False},
        ]
    )
    assert asyncio.run(read_body(receive, None, 100)) == b"abcd"


def test_read_body_refuses_declared_and_actual_oversize() -> None:
    with pytest.raises(PayloadTooLarge, match="101 bytes"):
        asyncio.run(read_body(_receiver([]), "101", 100))
    chunks = [{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 2
    with pytest.raises(PayloadTooLarge, match="limit of 100"):
        asyncio.run(read_body(_receiver(chunks), None, 100))


def test_read_body_reports_a_disconnect() -> None:
    receive = _receiver(
        [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}]
    )
    with pytest.raises(ClientDisconnected):
        asyncio.run(read_body(receive, None, 100))


def test_server_app_wraps_the_whole_app_unless_cors(tmp_path: Path) -> None:
    served = build_server_app(Settings(repository=tmp_path))
    assert isinstance(served, InferFastPath)
    assert isinstance(served.app, FastAPI)
    assert served.outermost
    # CORS must wrap the fast path, so the fast path stays inside the app's middleware
    with_cors = build_server_app(Settings(repository=tmp_path, cors_origins=["http://a"]))
    assert isinstance(with_cors, FastAPI)
    assert any(m.cls is InferFastPath for m in with_cors.user_middleware)
