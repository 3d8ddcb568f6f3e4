"""Streaming multipart uploads: parts saved to disk, limits enforced while streaming."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from serving.errors import InvalidInput, PayloadTooLarge
from serving.jobs.upload import receive_upload, upload_suffix

BOUNDARY = "slimserve-test-boundary"


def multipart(
    fields: dict[str, str] | None = None, files: dict[str, tuple[str, bytes]] | None = None
) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    out = bytearray()
    for name, value in (fields or {}).items():
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    for name, (filename, data) in (files or {}).items():
        out += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        out += data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={BOUNDARY}"


async def chunked(data: bytes, size: int = 7001) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def receive(data: bytes, content_type: str, dest: Path, **kw):
    return asyncio.run(receive_upload(chunked(data), content_type, dest, **kw))


def test_parts_stream_to_files(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 1000
    body, ctype = multipart(
        {"request": json.dumps({"name": "m"})},
        {"model": ("My Model.onnx", payload), "calibration": ("texts.txt", b"a\nb\n")},
    )
    form = receive(body, ctype, tmp_path / "up", max_bytes=10 << 20)
    assert json.loads(form.fields["request"]) == {"name": "m"}
    model = form.files["model"]
    assert model.filename == "My Model.onnx"
    assert model.path == (tmp_path / "up" / "model.onnx").resolve()
    assert model.path.read_bytes() == payload
    assert model.size == len(payload)
    assert form.files["calibration"].path.read_bytes() == b"a\nb\n"


def test_oversized_upload_is_413_naming_the_limit(tmp_path: Path) -> None:
    body, ctype = multipart({"request": "{}"}, {"model": ("m.onnx", bytes(50_000))})
    with pytest.raises(PayloadTooLarge, match="limit of 10000 bytes"):
        receive(body, ctype, tmp_path / "up", max_bytes=10_000)
    written = (tmp_path / "up" / "model.onnx").stat().st_size
    assert written <= 10_000, "never writes past the limit"


def test_declared_length_over_the_limit_is_refused_up_front(tmp_path: Path) -> None:
    body, ctype = multipart({"request": "{}"}, {"model": ("m.onnx", b"x")})
    with pytest.raises(PayloadTooLarge, match="SLIMSERVE_MAX_UPLOAD_BYTES"):
        receive(body, ctype, tmp_path / "up", max_bytes=1000, content_length=10 << 20)


@pytest.mark.parametrize(
    ("fields", "files", "content_type", "message"),
    [
        ({"request": "{}"}, {}, None, "no 'model' file part"),
        ({"model": "not a file"}, {}, None, "must be a file upload"),
        (
            {"request": "{}", "extra": "x"},
            {"model": ("m.onnx", b"x")},
            None,
            "unexpected form part 'extra'",
        ),
        ({}, {"model": ("m.onnx", b"x")}, "application/json", "multipart/form-data"),
    ],
)
def test_malformed_forms_are_400(tmp_path: Path, fields, files, content_type, message) -> None:
    body, ctype = multipart(fields, files)
    with pytest.raises(InvalidInput, match=message):
        receive(body, content_type or ctype, tmp_path / "up", max_bytes=1 << 20)


def test_file_suffixes() -> None:
    assert upload_suffix("bert.tar.gz") == ".tar.gz"
    assert upload_suffix("C:\\models\\a.ONNX") == ".onnx"
    assert upload_suffix("../../etc/passwd") == ""
    assert upload_suffix("x.$(rm)") == ""


def test_truncated_body_names_the_unfinished_part(tmp_path: Path) -> None:
    body, ctype = multipart({"request": "{}"}, {"model": ("m.onnx", bytes(1000))})
    with pytest.raises(InvalidInput, match="middle of form part 'model'"):
        receive(body[:-200], ctype, tmp_path / "up", max_bytes=1 << 20)


def test_early_refusal_reads_the_body_only_when_the_client_already_sent_it(
    tmp_path: Path,
) -> None:
    body, ctype = multipart({"request": "{}"}, {"model": ("m.onnx", bytes(100_000))})
    for expects_continue, drained in ((True, 0), (False, len(body))):
        seen: list[int] = []

        async def counting(seen: list[int] = seen) -> AsyncIterator[bytes]:
            async for chunk in chunked(body):
                seen.append(len(chunk))
                yield chunk

        with pytest.raises(PayloadTooLarge):
            asyncio.run(
                receive_upload(
                    counting(),
                    ctype,
                    tmp_path / "up",
                    max_bytes=1000,
                    content_length=len(body),
                    expects_continue=expects_continue,
                )
            )
        assert sum(seen) == drained
