"""The model repository: a Triton-layout folder of models and numeric versions.

``<root>/<model>/config.pbtxt`` plus ``<root>/<model>/<version>/model.onnx`` (or
``model.plan``). The repository never reads or writes outside its root, reports broken
entries instead of skipping them, and publishes new versions atomically.
This module imports neither FastAPI nor torch.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from serving.errors import InvalidInput, ModelNotFound, RepositoryError
from serving.fileutil import confined, fsync_dir, fsync_tree, validate_model_name
from serving.model_config import (
    PLATFORM_FILES,
    autocomplete_from_onnx,
    read_config,
    write_config,
)

TEMP_PREFIX = ".publishing-"


@dataclass(frozen=True)
class ModelVersion:
    """One servable version folder."""

    version: int
    path: Path
    model_file: Path


@dataclass
class ModelEntry:
    """What the repository knows about one model: its config, versions, or why it is broken."""

    name: str
    path: Path
    config: mc.ModelConfig | None = None
    versions: list[ModelVersion] = field(default_factory=list)
    all_versions: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def version(self, number: int) -> ModelVersion:
        for entry in self.versions:
            if entry.version == number:
                return entry
        raise ModelNotFound(
            f"model '{self.name}' has no servable version {number} "
            f"(servable: {[v.version for v in self.versions]})"
        )


def model_filename(config: mc.ModelConfig) -> str:
    """The file inside a version folder that holds the engine."""
    if config.default_model_filename:
        return config.default_model_filename
    return PLATFORM_FILES.get(config.platform, "model.onnx")


def apply_version_policy(config: mc.ModelConfig, versions: list[int]) -> list[int]:
    """The versions ``version_policy`` selects from those present (ascending)."""
    present = sorted(versions)
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return present
    if kind == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in present if v in wanted]
    count = policy.latest.num_versions if kind == "latest" else 1
    return present[-max(count, 1) :]


class ModelRepository:
    """A Triton-layout model repository rooted at ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {self.root} does not exist or is not a folder")

    # -- reading -----------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        """The folder of model ``name`` (validated and confined to the root)."""
        return confined(self.root, validate_model_name(name))

    def model_names(self) -> list[str]:
        """Names of the model folders (hidden and temp folders excluded), sorted."""
        names = []
        for child in self.root.iterdir():
            if child.name.startswith(".") or not child.is_dir():
                continue
            names.append(child.name)
        return sorted(names)

    def scan(self) -> dict[str, ModelEntry]:
        """Every model folder as an entry; broken ones carry ``error``."""
        entries = {}
        for name in self.model_names():
            try:
                entries[name] = self.entry(name)
            except InvalidInput as exc:  # a bad folder name or a symlink leaving the root
                entries[name] = ModelEntry(name=name, path=self.root / name, error=str(exc))
        return entries

    def entry(self, name: str) -> ModelEntry:
        """Read one model's config and versions. Never raises for a broken model folder."""
        path = self.model_dir(name)
        if not path.is_dir():
            raise ModelNotFound(f"model '{name}' is not in the repository")
        entry = ModelEntry(name=name, path=path)
        try:
            self._fill_entry(entry)
        except (RepositoryError, InvalidInput) as exc:
            entry.error = str(exc)
        except Exception as exc:  # a corrupt model file: report it, keep serving the rest
            entry.error = f"{type(exc).__name__}: {exc}"
        return entry

    def _fill_entry(self, entry: ModelEntry) -> None:
        config = read_config(entry.path)
        if config.name and config.name != entry.name:
            raise RepositoryError(
                f"config.pbtxt names the model '{config.name}' but its folder is '{entry.name}'"
            )
        entry.all_versions = self.version_numbers(entry.name)
        if not entry.all_versions:
            raise RepositoryError(f"model '{entry.name}' has no numeric version folder")
        filename = model_filename(config)
        newest = None
        for number in reversed(entry.all_versions):
            # confined to the root: a version folder symlinked outside is refused
            candidate = confined(self.root, entry.name, str(number), filename)
            if candidate.is_file():
                newest = candidate
                break
        if newest is None:
            raise RepositoryError(f"model '{entry.name}': no version folder holds '{filename}'")
        if config.platform in ("", "onnxruntime_onnx") and newest.suffix == ".onnx":
            config = autocomplete_from_onnx(config, newest, name=entry.name)
        if not config.name:
            config.name = entry.name
        if not config.platform and not config.backend:
            raise RepositoryError(f"model '{entry.name}': config.pbtxt sets no platform")
        entry.config = config
        selected = apply_version_policy(config, entry.all_versions)
        for number in selected:
            folder = entry.path / str(number)
            model_file = confined(self.root, entry.name, str(number), filename)
            if not model_file.is_file():
                raise RepositoryError(
                    f"model '{entry.name}' version {number}: '{filename}' is missing"
                )
            entry.versions.append(ModelVersion(number, folder, model_file))
        if not entry.versions:
            raise RepositoryError(
                f"model '{entry.name}': version_policy selects none of {entry.all_versions}"
            )

    def version_numbers(self, name: str) -> list[int]:
        """Numeric version folders present for ``name``, ascending."""
        path = self.model_dir(name)
        numbers = []
        for child in path.iterdir():
            if child.is_dir() and child.name.isdigit() and not child.name.startswith("0"):
                numbers.append(int(child.name))
        return sorted(numbers)

    # -- writing -----------------------------------------------------------------------
    def next_version(self, name: str) -> int:
        """One more than the highest version present (1 for a new model)."""
        path = self.model_dir(name)
        existing = self.version_numbers(name) if path.is_dir() else []
        return (existing[-1] + 1) if existing else 1

    def publish_version(
        self,
        name: str,
        files: dict[str, bytes | Path],
        *,
        version: int | None = None,
        config: mc.ModelConfig | None = None,
    ) -> int:
        """Publish a new version of ``name`` atomically and return its number.

        ``files`` maps paths relative to the version folder (e.g. ``model.onnx``,
        ``report.json``) to bytes or to a source file to copy. Everything is written to a
        hidden temp folder inside the model folder (same filesystem), fsynced, then renamed
        to the version number, so a crash leaves no half-written version behind. ``config``,
        if given, replaces config.pbtxt (written atomically after the version is in place).
        """
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        number = version if version is not None else self.next_version(name)
        if number < 1:
            raise InvalidInput(f"version must be a positive integer, got {number}")
        final = confined(model_dir, str(number))
        if final.exists():
            raise InvalidInput(f"model '{name}' already has version {number}")
        temp = confined(model_dir, f"{TEMP_PREFIX}{number}-{uuid.uuid4().hex}")
        temp.mkdir()
        try:
            for relative, content in files.items():
                target = confined(temp, relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    shutil.copyfile(content, target)
                else:
                    target.write_bytes(content)
            fsync_tree(temp)
            os.rename(temp, final)
            fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        if config is not None:
            config.name = name
            write_config(model_dir, config)
        return number

    def write_model_config(self, name: str, config: mc.ModelConfig) -> None:
        """Replace ``config.pbtxt`` of ``name`` atomically."""
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        config.name = name
        write_config(model_dir, config)

    def clean_stale_temp(self) -> list[Path]:
        """Remove temp folders left by an interrupted publish; returns what was removed."""
        removed = []
        for name in self.model_names():
            try:
                model_dir = self.model_dir(name)
            except InvalidInput:
                continue
            for child in model_dir.iterdir():
                if child.name.startswith(TEMP_PREFIX) and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child)
        return removed
