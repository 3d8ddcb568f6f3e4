"""Crash-safe file operations and path confinement."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from serving.errors import InvalidInput

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a safe model name, else raise ``InvalidInput``.

    Allowed: letters, digits, ``_ . -``, at most 128 characters, not starting with a dot;
    this rules out ``..``, slashes, and hidden folders.
    """
    if not MODEL_NAME_PATTERN.match(name) or name in {".", ".."} or ".." in name:
        raise InvalidInput(
            f"invalid model name {name!r}: use 1-128 letters, digits, '_', '.', '-' "
            "(starting with a letter or digit, no '..')"
        )
    return name


def confined(root: Path, *parts: str) -> Path:
    """``root / parts`` resolved, guaranteed to lie inside ``root``; ``InvalidInput`` otherwise."""
    root = root.resolve()
    candidate = root.joinpath(*parts).resolve()
    if candidate != root and root not in candidate.parents:
        raise InvalidInput(f"path {'/'.join(parts)!r} escapes {root}")
    return candidate


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (and ``path`` itself)."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
