"""Stream a ``multipart/form-data`` upload to disk under a size limit.

The body is parsed as it arrives (python-multipart's streaming parser): file parts go
straight to files in the job's upload folder, small text parts are kept in memory, and the
total is counted so an oversized upload is refused (413, naming the limit) without being
held in memory or written past the limit. Framework-free: it takes an async byte iterator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.multipart import MultipartParser, parse_options_header

from serving.errors import InvalidInput, PayloadTooLarge, SlimServeError
from serving.fileutil import confined

FILE_PARTS = ("model", "calibration")
TEXT_PARTS = ("request",)
MAX_TEXT_PART = 1 << 20
DRAIN_LIMIT = 64 << 20  # bytes read and dropped after a refusal, so the client sees the 4xx
SAFE_SUFFIX_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.")


@dataclass(frozen=True)
class SavedFile:
    """One uploaded file part: the client's file name, where it was saved, its size."""

    filename: str
    path: Path
    size: int


@dataclass
class UploadForm:
    files: dict[str, SavedFile] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


def upload_suffix(filename: str) -> str:
    """The lower-cased file suffix we act on (``.tar.gz`` counts as one), '' if none."""
    name = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1].lower()
    for double in (".tar.gz", ".tar.bz2", ".tar.xz"):
        if name.endswith(double):
            return double
    suffix = Path(name).suffix
    return suffix if set(suffix) <= SAFE_SUFFIX_CHARS else ""


class _FormReceiver:
    """python-multipart callbacks that write parts into ``dest``."""

    def __init__(self, dest: Path, max_bytes: int) -> None:
        self.dest = dest
        self.max_bytes = max_bytes
        self.total = 0
        self.form = UploadForm()
        self.error: Exception | None = None
        self._headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        self._name: str | None = None
        self._filename: str | None = None
        self._text: bytearray | None = None
        self._file: IO[bytes] | None = None
        self._file_path: Path | None = None
        self._file_size = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self._headers = {}
        self._name = self._filename = None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        key = self._field.decode("latin-1").lower()
        self._headers[key] = self._value.decode("utf-8", "replace")
        self._field = self._value = b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", ""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if name in self.form.files or name in self.form.fields:
            raise InvalidInput(f"form part '{name}' appears twice")
        if name in FILE_PARTS:
            if filename is None:
                raise InvalidInput(f"form part '{name}' must be a file upload")
            self._filename = filename.decode("utf-8", "replace")
            suffix = upload_suffix(self._filename)
            self._file_path = confined(self.dest, f"{name}{suffix}")
            self._file = self._file_path.open("wb")
            self._file_size = 0
        elif name in TEXT_PARTS:
            self._text = bytearray()
        else:
            known = ", ".join((*FILE_PARTS, *TEXT_PARTS))
            raise InvalidInput(f"unexpected form part '{name}'; expected: {known}")
        self._name = name

    def part_data(self, data: bytes, start: int, end: int) -> None:
        count = end - start
        self.total += count
        if self.total > self.max_bytes:
            raise PayloadTooLarge(
                f"upload is larger than the limit of {self.max_bytes} bytes "
                "(SLIMSERVE_MAX_UPLOAD_BYTES)"
            )
        if self._file is not None:
            self._file.write(data[start:end])
            self._file_size += count
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > MAX_TEXT_PART:
                raise InvalidInput(f"form part '{self._name}' is over {MAX_TEXT_PART} bytes")

    def part_end(self) -> None:
        if self._file is not None and self._file_path is not None and self._name:
            self._file.close()
            self.form.files[self._name] = SavedFile(
                self._filename or "", self._file_path, self._file_size
            )
        elif self._text is not None and self._name:
            try:
                self.form.fields[self._name] = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"form part '{self._name}' is not UTF-8 text") from None
        self._file = None
        self._text = None

    @property
    def in_part(self) -> bool:
        """Whether a part was begun but not ended."""
        return self._file is not None or self._text is not None

    @property
    def current(self) -> str:
        return self._name or "?"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary from a Content-Type header; ``InvalidInput`` if not multipart."""
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidInput(
            "send the upload as multipart/form-data with a 'model' file part and a "
            "'request' JSON part (optional 'calibration' file part)"
        )
    return boundary


async def receive_upload(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    dest: Path,
    *,
    max_bytes: int,
    content_length: int | None = None,
    expects_continue: bool = False,
) -> UploadForm:
    """Parse a multipart body from ``chunks`` into ``dest``; enforce ``max_bytes`` as it streams.

    On an error the rest of the body is read and discarded (bounded), so the client gets
    the 4xx response instead of a broken connection; a refusal before the first read leaves
    the body alone when the client waits for ``100 Continue`` (it has not sent it).
    """
    iterator = chunks.__aiter__()
    try:
        boundary = boundary_of(content_type)
        if content_length is not None and content_length > max_bytes + 64 * 1024:
            raise PayloadTooLarge(
                f"upload is larger than the limit of {max_bytes} bytes (SLIMSERVE_MAX_UPLOAD_BYTES)"
            )
    except SlimServeError:
        if not expects_continue:
            await drain_body(iterator)
        raise
    dest.mkdir(parents=True, exist_ok=True)
    receiver = _FormReceiver(dest, max_bytes)
    parser = MultipartParser(boundary, receiver.callbacks())
    try:
        async for chunk in iterator:
            parser.write(chunk)
        parser.finalize()
    except Exception as exc:
        receiver.close()
        await drain_body(iterator)
        if isinstance(exc, InvalidInput | PayloadTooLarge):
            raise
        raise InvalidInput(f"malformed multipart body: {exc}") from None
    truncated = receiver.in_part
    receiver.close()
    if truncated:
        raise InvalidInput(
            f"the upload ended in the middle of form part '{receiver.current}' (body truncated?)"
        )
    if "model" not in receiver.form.files:
        raise InvalidInput("the upload has no 'model' file part")
    return receiver.form


async def drain_body(iterator: AsyncIterator[bytes], *, limit: int = DRAIN_LIMIT) -> None:
    """Read and drop the rest of a request body (at most ``limit`` bytes)."""
    seen = 0
    try:
        async for chunk in iterator:
            seen += len(chunk)
            if seen > limit:
                return
    except Exception:
        return
