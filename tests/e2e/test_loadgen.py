"""bench/loadgen.py against a real socket: pre-encoded requests, split and pipelined
responses parsed by Content-Length, errors counted, its own CPU measured."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from bench.loadgen import encode_request, parse_head, run_load


def test_request_is_encoded_once_with_length() -> None:
    raw = encode_request("http://127.0.0.1:9/v2/models/m/infer?x=1", b"abc", {"X-A": "1"})
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.split(b"\r\n")[0] == b"POST /v2/models/m/infer?x=1 HTTP/1.1"
    assert b"Content-Length: 3" in head
    assert b"X-A: 1" in head
    assert body == b"abc"


def test_head_parsing() -> None:
    assert parse_head(b"HTTP/1.1 200 OK\r\ncontent-type: x\r\nContent-Length: 12") == (200, 12)
    with pytest.raises(ValueError, match="Content-Length"):
        parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked")


class _Stub(asyncio.Protocol):
    """Answers every request; every third one with a 500, each answer in two writes."""

    served = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            _Stub.served += 1
            status = b"500 Internal Server Error" if _Stub.served % 3 == 0 else b"200 OK"
            body = b'{"error": "boom"}' if status[0:1] == b"5" else b"x" * 5000
            self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: ")
            self.transport.write(str(len(body)).encode() + b"\r\n\r\n" + body)


@pytest.fixture
def stub_port() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_Stub, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield port
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_closed_loop_counts_answers_and_errors(stub_port: int) -> None:
    url = f"http://127.0.0.1:{stub_port}/infer"
    result = run_load(url, b"payload", concurrency=4, duration_s=0.5, warmup_s=0.1)
    assert result.requests > 20
    assert result.completed >= result.requests
    assert 0.2 < result.errors / result.requests < 0.45  # every third answer is a 500
    assert result.first_error.startswith("500: ")
    assert "boom" in result.first_error
    assert result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.little_throughput > 0
    assert result.client_cpu_s > 0
    assert 0.6 <= result.elapsed_s < 5  # warm-up + window + drain
