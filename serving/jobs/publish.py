"""Publish a finished job's result into the model repository, or take it back.

A new model gets the original (as ONNX) as one version and the winning engine as the next,
with ``config.pbtxt`` (platform from the result, ``dynamic_batching`` on, ``max_batch_size``
at least the job's ``batch_size``, inputs and outputs left to auto-complete for ONNX). An
existing model gets the winner, plus the original when no existing version holds the same
bytes. ``report.json`` names ``source_version``.
A winner measured on a CPU accelerator (``report.engine.cpu_execution_accelerator``, e.g.
``openvino``) adds it to the model's config, with the ``static_shapes`` it was timed
compiled for (``report.engine.static_shapes``, a job's ``static_shape``). A non-ONNX engine
(``tensorrt_plan``: ``model.plan`` + ``model.plan.json``) is published the same way; its
model's config selects only the latest version, since the original version folder holds
``model.onnx``, not the platform's file (one platform per model, as in Triton).
An ONNX winner timed on CUDA (``report.engine.device == "gpu"``, a ``cuda`` target job on a
host with ``onnxruntime-gpu``) is served on a GPU: the config gets a ``KIND_GPU`` instance
group. Timed on the CPU (no CUDA provider here), the config is left on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from serving.errors import Conflict, InvalidInput
from serving.fileutil import atomic_write_bytes, confined
from serving.model_config import PLATFORM_FILES, autocomplete_from_onnx
from serving.repository import ModelRepository, model_filename


@dataclass
class Published:
    """What one publish added: version numbers, and whether it created the model."""

    name: str
    version: int
    source_version: int
    added_versions: list[int] = field(default_factory=list)
    created_model: bool = False
    old_config: bytes | None = None
    report: dict[str, Any] = field(default_factory=dict)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def new_model_config(platform: str, original_onnx: Path, name: str) -> mc.ModelConfig:
    """config.pbtxt for a new model: platform, max_batch_size, dynamic batching."""
    described = autocomplete_from_onnx(mc.ModelConfig(), original_onnx, name=name)
    config = mc.ModelConfig(name=name, platform=platform)
    config.max_batch_size = described.max_batch_size
    if platform != "onnxruntime_onnx":  # auto-complete only reads ONNX graphs
        config.input.extend(described.input)
        config.output.extend(described.output)
    if config.max_batch_size > 0:
        config.dynamic_batching.SetInParent()
    if platform != "onnxruntime_onnx":
        # Version 1 holds the original as model.onnx, which this platform cannot serve; only
        # the newest version (the engine, e.g. model.plan) is selected. The original stays as
        # ``source_version`` for the report and re-optimization, not for serving.
        config.version_policy.latest.num_versions = 1
    return config


def with_cpu_accelerator(
    config: mc.ModelConfig, name: str, parameters: dict[str, str] | None = None
) -> mc.ModelConfig | None:
    """A copy of ``config`` naming ``cpu_execution_accelerator { name }`` with ``parameters``
    set on it, or None when it already does (config.pbtxt is then left as it is)."""
    parameters = parameters or {}
    accelerators = config.optimization.execution_accelerators.cpu_execution_accelerator
    current = next((accel for accel in accelerators if accel.name == name), None)
    if current is not None and all(current.parameters.get(k) == v for k, v in parameters.items()):
        return None
    updated = mc.ModelConfig()
    updated.CopyFrom(config)
    accelerators = updated.optimization.execution_accelerators.cpu_execution_accelerator
    target = next((accel for accel in accelerators if accel.name == name), None)
    if target is None:
        target = accelerators.add(name=name)
    for key, value in parameters.items():
        target.parameters[key] = value
    return updated


def with_gpu_instances(config: mc.ModelConfig) -> mc.ModelConfig | None:
    """A copy of ``config`` whose instances run on a GPU (``instance_group [{kind: KIND_GPU,
    count: 1}]``), or None when it already has a KIND_GPU group (left as it is)."""
    if any(group.kind == mc.ModelInstanceGroup.KIND_GPU for group in config.instance_group):
        return None
    updated = mc.ModelConfig()
    updated.CopyFrom(config)
    del updated.instance_group[:]
    updated.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    return updated


def _matching_version(repository: ModelRepository, name: str, original: Path) -> int | None:
    """An existing version whose model.onnx has the same bytes as ``original``."""
    digest = None
    for number in reversed(repository.version_numbers(name)):
        candidate = repository.model_dir(name) / str(number) / "model.onnx"
        if candidate.is_file() and candidate.stat().st_size == original.stat().st_size:
            digest = digest or file_digest(original)
            if file_digest(candidate) == digest:
                return number
    return None


def _report(result: dict[str, Any]) -> dict[str, Any]:
    report = dict(result.get("report") or {})
    report_file = (result.get("files") or {}).get("report.json")
    if not report and report_file and Path(report_file).is_file():
        report = json.loads(Path(report_file).read_text(encoding="utf-8"))
    return report


def publish_result(
    repository: ModelRepository, name: str, result: dict[str, Any], *, job_id: str
) -> Published:
    """Publish ``result`` (a worker's ``result.json``) as new version(s) of ``name``."""
    platform = result["platform"]
    if platform not in PLATFORM_FILES:
        raise InvalidInput(f"the pipeline produced platform '{platform}', which cannot be served")
    engine = Path(result["engine_file"])
    original = Path(result["original_file"]) if result.get("original_file") else None
    if original is None or not original.is_file():
        raise InvalidInput("the pipeline returned no original ONNX file to publish")
    model_dir = repository.model_dir(name)
    existing = model_dir.is_dir() and bool(repository.version_numbers(name))
    config = None
    if existing:
        entry = repository.entry(name)
        if entry.config is None:
            raise Conflict(f"model '{name}' in the repository is broken ({entry.error}); fix it")
        if (
            entry.config.platform != platform
            or model_filename(entry.config) != (PLATFORM_FILES[platform])
        ):
            raise Conflict(
                f"model '{name}' is served as '{entry.config.platform}', but the optimized "
                f"engine is '{platform}'; upload it under a new model name"
            )
    else:
        config = new_model_config(platform, original, name)
        batch = int((_report(result).get("request") or {}).get("batch_size") or 0)
        if 0 < config.max_batch_size < batch:  # the batch the job optimized and timed for
            config.max_batch_size = batch
    engine_report = _report(result).get("engine") or {}
    accelerator = engine_report.get("cpu_execution_accelerator")
    if accelerator:  # the engine was measured on it (e.g. openvino_int8): serve it there too
        base = config or repository.entry(name).config
        parameters = {}
        if engine_report.get("static_shapes"):  # timed compiled for that shape: so served
            parameters["static_shapes"] = str(engine_report["static_shapes"])
        config = with_cpu_accelerator(base, accelerator, parameters) or config
    if engine_report.get("device") == "gpu":  # measured on CUDA (a ``cuda`` target job)
        config = with_gpu_instances(config or repository.entry(name).config) or config
    config_path = model_dir / "config.pbtxt"
    published = Published(
        name=name,
        version=0,
        source_version=0,
        created_model=not model_dir.exists(),
        old_config=config_path.read_bytes() if config_path.is_file() else None,
    )
    try:
        source_version = _matching_version(repository, name, original) if existing else None
        if source_version is None:
            original_files: dict[str, bytes | Path] = {"model.onnx": original}
            for relative, path in (result.get("original_files") or {}).items():
                original_files[relative] = Path(path)
            source_version = repository.publish_version(name, original_files)
            published.added_versions.append(source_version)
        report = {**_report(result), "source_version": source_version, "job_id": job_id}
        files: dict[str, bytes | Path] = {PLATFORM_FILES[platform]: engine}
        for relative, path in (result.get("files") or {}).items():
            if relative != "report.json":
                files[relative] = Path(path)
        files["report.json"] = json.dumps(report, indent=1, default=str).encode("utf-8")
        version = repository.publish_version(name, files, config=config)
        published.added_versions.append(version)
    except BaseException:
        rollback(repository, published)
        raise
    published.version = version
    published.source_version = source_version
    published.report = report
    return published


def rollback(repository: ModelRepository, published: Published) -> None:
    """Remove what ``published`` added (the whole model folder if it created the model)."""
    model_dir = repository.model_dir(published.name)
    if published.created_model:
        shutil.rmtree(model_dir, ignore_errors=True)
        return
    for number in published.added_versions:
        shutil.rmtree(confined(model_dir, str(number)), ignore_errors=True)
    config_path = model_dir / "config.pbtxt"
    if published.old_config is not None:
        if not config_path.is_file() or config_path.read_bytes() != published.old_config:
            atomic_write_bytes(config_path, published.old_config)
    else:
        config_path.unlink(missing_ok=True)
