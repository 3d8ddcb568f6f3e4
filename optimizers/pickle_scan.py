"""Static checks of pickled data (``.pt2`` archives, torch files) without ever unpickling it.

``torch.export.load`` unpickles parts of a ``.pt2`` archive (sample inputs, pickled weights
and constants, custom objects), and for some of them falls back to ``weights_only=False``:
a crafted ``.pt2`` would run code in the worker. So before a ``.pt2`` is accepted, every
pickle in it is read opcode by opcode (``pickletools.genops``) and refused unless the only
globals it names are the ones ``torch.save`` uses for plain tensors.
"""

from __future__ import annotations

import io
import json
import pickletools
import zipfile
from pathlib import PurePosixPath

from serving.errors import InvalidInput

TORCH_DTYPES = frozenset(
    {
        "float16", "float32", "float64", "bfloat16", "complex64", "complex128", "int8", "int16",
        "int32", "int64", "uint8", "bool", "float", "half", "double", "long", "int", "short",
    }
)  # fmt: skip
SAFE_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch", "Tensor"),
        ("torch", "strided"),
        ("torch.nn.parameter", "Parameter"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }
)
STRING_PUSHES = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
     "SHORT_BINSTRING"}
)  # fmt: skip
MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
MAX_PICKLES_PER_STREAM = 5  # legacy torch.save: magic, protocol, sys info, data, storage keys
MAX_MEMBER_BYTES = 1 << 30
RISKY_CONSTANT_PREFIXES = ("custom_obj", "opaque_obj")


def safe_global(module: str, name: str) -> bool:
    """Whether unpickling may look up ``module.name`` (plain tensors and containers only)."""
    if (module, name) in SAFE_GLOBALS:
        return True
    return module == "torch" and (name.endswith("Storage") or name in TORCH_DTYPES)


def check_pickle_stream(data: bytes, where: str) -> None:
    """Refuse ``data`` (one or more concatenated pickles) if it names any unsafe global."""
    stream = io.BytesIO(data)
    for _ in range(MAX_PICKLES_PER_STREAM):
        if stream.tell() >= len(data):
            return
        _check_one(stream, where)


def _check_one(stream: io.BytesIO, where: str) -> None:
    recent: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for opcode, arg, _position in pickletools.genops(stream):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                module, _, attribute = str(arg).partition(" ")
                _require_safe(module, attribute, where)
            elif name == "STACK_GLOBAL":
                if len(recent) < 2 or recent[-2] is None or recent[-1] is None:
                    raise InvalidInput(
                        f"{where}: pickle builds an object from a computed global name; refused"
                    )
                _require_safe(recent[-2], recent[-1], where)
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise InvalidInput(f"{where}: pickle uses the copyreg extension registry; refused")
            if name in STRING_PUSHES:
                recent.append(str(arg))
            elif name in MEMO_GETS:
                recent.append(memo.get(int(arg)))
            elif name in MEMO_PUTS:
                memo[int(arg)] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            else:
                recent.append(None)
            del recent[:-2]
    except ValueError as exc:
        raise InvalidInput(f"{where}: not a readable pickle ({exc}); refused") from None


def _require_safe(module: str, name: str, where: str) -> None:
    if not safe_global(module, name):
        raise InvalidInput(
            f"{where}: pickled data would call {module}.{name} when loaded, which can run "
            "arbitrary code; refused (save plain tensors only)"
        )


def check_torch_file(data: bytes, where: str) -> None:
    """A ``torch.save`` payload: a zip with ``data.pkl`` (checked) or a legacy pickle stream."""
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                for info in inner.infolist():
                    if info.filename.endswith(".pkl"):
                        check_pickle_stream(inner.read(info), f"{where}:{info.filename}")
        except zipfile.BadZipFile as exc:
            raise InvalidInput(f"{where}: corrupt torch file ({exc})") from None
        return
    check_pickle_stream(data, where)


def _pickled_members(archive: zipfile.ZipFile) -> dict[str, str]:
    """Members torch.export.load would unpickle: member name -> why."""
    names = archive.namelist()
    found: dict[str, str] = {}
    for name in names:
        path = PurePosixPath(name)
        if path.suffix in (".pt", ".pkl", ".pickle") or "sample_inputs" in path.parts:
            found[name] = "torch file"
    for name in names:
        path = PurePosixPath(name)
        if not (name.endswith("_weights_config.json") or name.endswith("_constants_config.json")):
            continue
        try:
            config = json.loads(archive.read(name)).get("config", {})
        except (ValueError, AttributeError):
            raise InvalidInput(f"{name}: not a valid torch.export payload config") from None
        for fqn, meta in config.items():
            path_name = str(meta.get("path_name", ""))
            member = str(path.parent / path_name)
            if path_name.startswith(RISKY_CONSTANT_PREFIXES):
                raise InvalidInput(
                    f"{member}: custom or opaque object '{fqn}' is stored as a pickle, which "
                    "can run code when loaded; refused"
                )
            if meta.get("use_pickle"):
                found[member] = "pickled tensor"
    return found


def check_pt2(path: str | object) -> int:
    """Check every pickle a ``.pt2`` archive holds; returns how many were checked."""
    try:
        archive = zipfile.ZipFile(str(path))
    except zipfile.BadZipFile as exc:
        raise InvalidInput(f"not a torch.export archive (.pt2 is a zip): {exc}") from None
    with archive:
        members = _pickled_members(archive)
        for name in sorted(members):
            try:
                info = archive.getinfo(name)
            except KeyError:
                continue
            if info.file_size > MAX_MEMBER_BYTES:
                raise InvalidInput(f"{name}: pickled member over {MAX_MEMBER_BYTES} bytes")
            check_torch_file(archive.read(info), name)
    return len(members)
