"""Safe extraction of uploaded archives (zip, tar, tar.gz): nothing escapes the destination.

Refused with ``InvalidInput``: absolute paths, ``..`` members, symbolic or hard links,
devices/FIFOs; ``PayloadTooLarge`` when the members' total size or count exceeds the limits.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from serving.errors import InvalidInput, PayloadTooLarge

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
DEFAULT_MAX_BYTES = 4 * 1024**3
DEFAULT_MAX_MEMBERS = 10_000


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(ARCHIVE_SUFFIXES)


def _member_path(dest: Path, name: str) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or any(part == ".." for part in pure.parts) or name.startswith("/"):
        raise InvalidInput(f"archive member {name!r} escapes the extraction folder")
    target = (dest / Path(*pure.parts)).resolve() if pure.parts else dest
    if target != dest and dest not in target.parents:
        raise InvalidInput(f"archive member {name!r} escapes the extraction folder")
    return target


def safe_extract(
    archive: Path,
    dest: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Path:
    """Extract ``archive`` into ``dest`` (created), checking every member first."""
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            _extract_zip(archive, dest, max_bytes, max_members)
        elif name.endswith((".tar", ".tar.gz", ".tgz")):
            _extract_tar(archive, dest, max_bytes, max_members)
        else:
            supported = ", ".join(ARCHIVE_SUFFIXES)
            raise InvalidInput(f"{archive.name}: not a supported archive ({supported})")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise InvalidInput(f"{archive.name}: corrupt archive: {exc}") from exc
    return dest


def _check_totals(count: int, total: int, max_bytes: int, max_members: int) -> None:
    if count > max_members:
        raise PayloadTooLarge(f"archive has {count} members, more than the limit of {max_members}")
    if total > max_bytes:
        raise PayloadTooLarge(
            f"archive expands to {total} bytes, more than the limit of {max_bytes} bytes"
        )


def _extract_zip(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        _check_totals(len(infos), sum(i.file_size for i in infos), max_bytes, max_members)
        plan = []
        for info in infos:
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidInput(f"archive member {info.filename!r} is a symbolic link (refused)")
            plan.append((info, _member_path(dest, info.filename)))
        written = 0
        for info, target in plan:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                written = _copy_bounded(src, out, written, max_bytes)


def _extract_tar(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        _check_totals(len(members), sum(m.size for m in members), max_bytes, max_members)
        plan = []
        for member in members:
            if member.issym() or member.islnk():
                raise InvalidInput(f"archive member {member.name!r} is a link (refused)")
            if not (member.isfile() or member.isdir()):
                raise InvalidInput(
                    f"archive member {member.name!r} is not a regular file (refused)"
                )
            plan.append((member, _member_path(dest, member.name)))
        written = 0
        for member, target in plan:
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(member)
            if src is None:
                continue
            with src, open(target, "wb") as out:
                written = _copy_bounded(src, out, written, max_bytes)


def _copy_bounded(src, out, written: int, max_bytes: int) -> int:
    while True:
        chunk = src.read(1 << 20)
        if not chunk:
            return written
        written += len(chunk)
        if written > max_bytes:
            raise PayloadTooLarge(f"archive expands to more than the limit of {max_bytes} bytes")
        out.write(chunk)


def single_root(folder: Path) -> Path:
    """The folder itself, or its only sub-folder when the archive wrapped everything in one."""
    children = [c for c in folder.iterdir() if not c.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir():
        return children[0]
    return folder


__all__ = ["is_archive", "safe_extract", "single_root"]
