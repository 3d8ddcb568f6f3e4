"""Safe extraction and inspection of uploaded model archives.

An upload is untrusted: archives are unpacked member by member (never ``extractall``) into
a folder the caller owns, refusing absolute paths, ``..`` components, links, device files
and anything past the member-count or size limits. Pickle checkpoints are refused (they run
code when loaded) unless a safetensors file makes them unnecessary, and ONNX external-data
locations must stay inside the model folder. Nothing here unpickles or imports torch.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

from serving.errors import InvalidInput, PayloadTooLarge
from serving.fileutil import confined

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
SKIPPED_PREFIXES = ("__MACOSX/",)
CHUNK = 1 << 20

SourceKind = Literal["onnx", "pt2", "hf"]


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what one archive may unpack to."""

    max_members: int = 10_000
    max_total_bytes: int = 16 << 30


@dataclass(frozen=True)
class ModelSource:
    """What an upload turned out to be: ``path`` is the file or folder to optimize."""

    kind: SourceKind
    path: Path


def archive_kind(path: Path) -> Literal["zip", "tar"] | None:
    """``"zip"`` or ``"tar"`` judged by the file's content (not its name), else None."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, tarfile.TarError):
        return None
    return None


def _safe_relative(name: str) -> PurePosixPath | None:
    """The member name as a safe relative path; None for entries to skip; raises otherwise."""
    if name.startswith(SKIPPED_PREFIXES):
        return None
    if "\\" in name or "\x00" in name:
        raise InvalidInput(f"archive member {name!r} has a backslash or NUL in its name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise InvalidInput(f"archive member {name!r} has an absolute path")
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"archive member {name!r} points outside the archive ('..')")
    if not parts:
        return None
    return PurePosixPath(*parts)


class _Budget:
    """Counts members and bytes written; raises ``PayloadTooLarge`` naming the limit."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.members = 0
        self.bytes = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise PayloadTooLarge(
                f"archive has more than {self.limits.max_members} members (the limit for one "
                "upload)"
            )

    def declare(self, size: int) -> None:
        """Refuse early when a member's declared size alone would pass the limit."""
        if self.bytes + size > self.limits.max_total_bytes:
            self.add(size)

    def add(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.limits.max_total_bytes:
            raise PayloadTooLarge(
                f"archive unpacks to more than {self.limits.max_total_bytes} bytes (the limit "
                "for one upload: 4x SLIMSERVE_MAX_UPLOAD_BYTES)"
            )


def _copy_member(source: IO[bytes], target: Path, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise InvalidInput(f"archive member {target.name!r} appears twice")
    with target.open("wb") as out:
        while chunk := source.read(CHUNK):
            budget.add(len(chunk))
            out.write(chunk)


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    try:
        handle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise InvalidInput(f"upload is not a valid zip archive: {exc}") from None
    with handle:
        for info in handle.infolist():
            budget.member()
            relative = _safe_relative(info.filename)
            if relative is None:
                continue
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                what = "a symlink" if stat.S_ISLNK(mode) else "a special file"
                raise InvalidInput(f"archive member {info.filename!r} is {what}; refused")
            if info.flag_bits & 0x1:
                raise InvalidInput(f"archive member {info.filename!r} is encrypted")
            target = confined(dest, *relative.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            budget.declare(info.file_size)
            try:
                with handle.open(info) as source:
                    _copy_member(source, target, budget)
            except (zipfile.BadZipFile, NotImplementedError, EOFError) as exc:
                raise InvalidInput(f"archive member {info.filename!r} is corrupt: {exc}") from None


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    try:
        handle = tarfile.open(archive, mode="r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise InvalidInput(f"upload is not a valid tar archive: {exc}") from None
    with handle:
        try:
            for member in handle:
                budget.member()
                relative = _safe_relative(member.name)
                if relative is None:
                    continue
                if member.issym() or member.islnk():
                    raise InvalidInput(
                        f"archive member {member.name!r} is a link ({member.linkname!r}); refused"
                    )
                if not (member.isfile() or member.isdir()):
                    raise InvalidInput(
                        f"archive member {member.name!r} is a device, FIFO or other special "
                        "file; refused"
                    )
                target = confined(dest, *relative.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                budget.declare(member.size)
                source = handle.extractfile(member)
                if source is None:
                    raise InvalidInput(f"archive member {member.name!r} cannot be read")
                with source:
                    _copy_member(source, target, budget)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidInput(f"tar archive is corrupt: {exc}") from None


def extract_archive(archive: Path, dest: Path, *, limits: ArchiveLimits | None = None) -> Path:
    """Unpack a zip or tar(.gz) ``archive`` into ``dest`` safely; returns ``dest``.

    Raises ``InvalidInput`` for unsafe or corrupt members and ``PayloadTooLarge`` past the
    limits. On any error ``dest`` is removed, so nothing half-extracted stays behind.
    """
    limits = limits or ArchiveLimits()
    kind = archive_kind(archive)
    if kind is None:
        raise InvalidInput(f"'{archive.name}' is neither a zip nor a tar archive")
    dest.mkdir(parents=True, exist_ok=False)
    budget = _Budget(limits)
    try:
        if kind == "zip":
            _extract_zip(archive, dest, budget)
        else:
            _extract_tar(archive, dest, budget)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def single_root(folder: Path) -> Path:
    """Descend through folders that hold nothing but one sub-folder (``model/...`` archives)."""
    while True:
        children = [c for c in folder.iterdir() if not c.name.startswith(".")]
        if len(children) == 1 and children[0].is_dir():
            folder = children[0]
        else:
            return folder


# -- ONNX external data -------------------------------------------------------------------
def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)


def external_data_locations(model_path: Path) -> list[str]:
    """The ``location`` of every externally stored tensor of an ONNX file (data not loaded)."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise InvalidInput(f"'{model_path.name}' is not a valid ONNX model: {exc}") from None
    tensors = list(_graph_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors.extend(_node_tensors(node))
    locations = []
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location")
        if not location:
            raise InvalidInput(
                f"'{model_path.name}': tensor '{tensor.name}' is external but names no location"
            )
        locations.append(location)
    return sorted(set(locations))


def check_onnx_external_data(model_path: Path) -> list[Path]:
    """Check every external-data location stays inside the model's folder and exists.

    Returns the data files. Refuses absolute paths, ``..``, symlinks and missing files.
    """
    folder = model_path.parent
    files = []
    for location in external_data_locations(model_path):
        try:
            relative = _safe_relative(location)
        except InvalidInput:
            relative = None
        if relative is None:
            raise InvalidInput(
                f"'{model_path.name}' stores tensors at {location!r}, outside its folder"
            )
        lexical = folder.joinpath(*relative.parts)
        target = confined(folder, *relative.parts)
        if lexical.is_symlink() or not target.is_file():
            raise InvalidInput(
                f"'{model_path.name}' stores tensors in {location!r}, which is not in the "
                "upload; send the model and its data files together as a .zip or .tar.gz"
            )
        files.append(target)
    return files


# -- pickles ------------------------------------------------------------------------------
def refuse_pickles(
    folder: Path, *, exempt: set[Path] | frozenset[Path] = frozenset()
) -> list[Path]:
    """Refuse pickle checkpoints in ``folder``; returns the ones removed as redundant.

    A ``.bin/.pt/.pth/.ckpt/.pkl`` file next to a ``.safetensors`` file is deleted unread
    (the safetensors weights are used instead); one without that alternative is an
    ``InvalidInput``. ``exempt`` lists files known to be something else (ONNX external data).
    """
    exempt = {p.resolve() for p in exempt}
    removed = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in PICKLE_SUFFIXES:
            continue
        if path.resolve() in exempt:
            continue
        if any(path.parent.glob("*.safetensors")):
            path.unlink()
            removed.append(path)
            continue
        raise InvalidInput(
            f"'{path.relative_to(folder)}' is a pickle checkpoint, which can run code when "
            "loaded, so it is refused; save the weights as safetensors "
            "(model.save_pretrained(..., safe_serialization=True)) or export to ONNX"
        )
    return removed


def inspect_model_folder(folder: Path) -> ModelSource:
    """Decide what an unpacked upload holds and check it is safe to hand to the pipeline.

    An ONNX model (one ``.onnx`` file, external data inside the folder), a ``.pt2``
    torch.export archive, or a Hugging Face checkpoint (``config.json`` + safetensors).
    """
    root = single_root(folder)
    for path in root.rglob("*"):
        if path.is_symlink():
            raise InvalidInput(f"'{path.relative_to(folder)}' is a symlink; refused")
    onnx_files = sorted(p for p in root.rglob("*.onnx") if p.is_file())
    if onnx_files:
        preferred = [p for p in onnx_files if p.name == "model.onnx"]
        if len(onnx_files) > 1 and len(preferred) != 1:
            names = ", ".join(str(p.relative_to(root)) for p in onnx_files[:5])
            raise InvalidInput(
                f"archive holds several ONNX files ({names}); name the one to optimize model.onnx"
            )
        model = preferred[0] if preferred else onnx_files[0]
        data_files = set(check_onnx_external_data(model))
        refuse_pickles(root, exempt=data_files)
        return ModelSource("onnx", model)
    refuse_pickles(root)
    pt2 = sorted(p for p in root.rglob("*.pt2") if p.is_file())
    if len(pt2) == 1:
        return ModelSource("pt2", pt2[0])
    if (root / "config.json").is_file() and any(root.glob("*.safetensors")):
        return ModelSource("hf", root)
    present = ", ".join(
        sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())[:8]
    )
    raise InvalidInput(
        "archive holds no model: expected an ONNX model (model.onnx and its data), a .pt2 "
        "torch.export archive, or a Hugging Face folder with config.json and "
        f"model.safetensors; found: {present or 'nothing'}"
    )
