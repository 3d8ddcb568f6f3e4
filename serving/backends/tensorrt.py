"""Native TensorRT engine (``model.plan``) on one GPU, with a ``model.plan.json`` sidecar.

A plan only runs with the TensorRT version and GPU compute capability it was built for, so
the build step records both (plus the GPU name, optimization profiles and I/O) in the
sidecar, and loading refuses a mismatch with ``ModelNotReady`` naming it, before TensorRT
sees the bytes.

Device memory and streams come from **torch's CUDA allocator** (``torch.cuda``; no
``cuda-python``/``cupy``): one stream per instance, one device buffer per I/O tensor sized
for the largest shape any optimization profile allows, allocated once and reused by every
batch. ``tensorrt`` and ``torch`` are imported only when an engine is created, so this module
(and the pure helpers below, tested without a GPU) import anywhere.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.backends.base import TensorSpec
from serving.datatypes import V2_TO_NUMPY
from serving.errors import EngineError, InvalidInput, ModelNotReady, RepositoryError
from serving.fileutil import atomic_write_text

log = logging.getLogger(__name__)

METADATA_SUFFIX = ".json"
"""The sidecar is ``<plan file name>.json`` (``model.plan.json``)."""
METADATA_FORMAT = 1

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]
"""One optimization profile: input name -> (min, opt, max) shapes."""

# tensorrt.DataType member names -> v2 datatypes. BF16/FP8/INT4/FP4 have no numpy dtype
# here and are refused at load (strongly typed graphs keep FP32/FP16 I/O anyway).
TRT_TO_V2: dict[str, str] = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
    "UINT8": "UINT8",
}


def trt_to_v2(dtype: Any) -> str:
    """The v2 datatype of a ``tensorrt.DataType`` (or its member name); ``ModelNotReady``
    when the engine uses a type the server cannot exchange."""
    name = getattr(dtype, "name", str(dtype)).rsplit(".", 1)[-1]
    try:
        return TRT_TO_V2[name]
    except KeyError:
        raise ModelNotReady(
            f"TensorRT tensor type {name} has no v2 datatype; build the engine with "
            f"I/O in one of {', '.join(TRT_TO_V2)}"
        ) from None


@dataclass(frozen=True)
class PlanMetadata:
    """What ``model.plan.json`` records about the machine and build that made the plan."""

    tensorrt_version: str
    compute_capability: str
    gpu_name: str
    profiles: list[ProfileShapes]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    strongly_typed: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (shapes as lists)."""
        return {
            "format": METADATA_FORMAT,
            "tensorrt_version": self.tensorrt_version,
            "compute_capability": self.compute_capability,
            "gpu_name": self.gpu_name,
            "strongly_typed": self.strongly_typed,
            "profiles": [
                {name: [list(s) for s in shapes] for name, shapes in profile.items()}
                for profile in self.profiles
            ],
            "inputs": [{**asdict(s), "shape": list(s.shape)} for s in self.inputs],
            "outputs": [{**asdict(s), "shape": list(s.shape)} for s in self.outputs],
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlanMetadata:
        """Parse a sidecar dict; ``RepositoryError`` naming the missing or malformed field."""
        if not isinstance(data, Mapping):
            raise RepositoryError("TensorRT metadata must be a JSON object")
        if data.get("format", METADATA_FORMAT) != METADATA_FORMAT:
            raise RepositoryError(
                f"TensorRT metadata format {data.get('format')!r} is not supported "
                f"(expected {METADATA_FORMAT}); rebuild the engine"
            )
        try:
            profiles = [
                {
                    str(name): tuple(tuple(int(d) for d in s) for s in shapes)
                    for name, shapes in profile.items()
                }
                for profile in data["profiles"]
            ]
            for profile in profiles:
                for name, shapes in profile.items():
                    if len(shapes) != 3:
                        raise ValueError(f"profile for {name!r} needs [min, opt, max]")
            return cls(
                tensorrt_version=str(data["tensorrt_version"]),
                compute_capability=str(data["compute_capability"]),
                gpu_name=str(data["gpu_name"]),
                profiles=profiles,
                inputs=[_spec(item) for item in data["inputs"]],
                outputs=[_spec(item) for item in data["outputs"]],
                strongly_typed=bool(data.get("strongly_typed", True)),
                extra=dict(data.get("extra") or {}),
            )
        except KeyError as exc:
            raise RepositoryError(f"TensorRT metadata lacks field {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise RepositoryError(f"TensorRT metadata is malformed: {exc}") from None


def _spec(item: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(
        str(item["name"]), str(item["datatype"]), tuple(int(d) for d in item["shape"])
    )


def metadata_path(plan_file: Path) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    return plan_file.with_name(plan_file.name + METADATA_SUFFIX)


def read_metadata(plan_file: Path) -> PlanMetadata:
    """The sidecar of ``plan_file``; ``ModelNotReady`` when it is missing (a plan without
    one cannot be checked against this machine), ``RepositoryError`` when it is broken."""
    path = metadata_path(plan_file)
    if not path.is_file():
        raise ModelNotReady(
            f"{plan_file.name} has no {path.name} beside it: the TensorRT version and GPU it was "
            "built for are unknown; rebuild it with slimserve's TensorRT build step"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"{path.name} is not readable JSON: {exc}") from None
    return PlanMetadata.from_json(data)


def write_metadata(plan_file: Path, metadata: PlanMetadata) -> Path:
    """Write the sidecar beside ``plan_file`` (used by the build step)."""
    path = metadata_path(plan_file)
    atomic_write_text(path, json.dumps(metadata.to_json(), indent=2) + "\n")
    return path


@dataclass(frozen=True)
class GpuEnvironment:
    """What this machine offers one instance: TensorRT version and the chosen GPU."""

    tensorrt_version: str
    compute_capability: str
    gpu_name: str


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def compatibility_problems(metadata: PlanMetadata, env: GpuEnvironment) -> list[str]:
    """Why a plan built as ``metadata`` cannot run in ``env`` (empty when it can).

    TensorRT plans are tied to the TensorRT major.minor release that built them and to the
    GPU's compute capability; another GPU model of the same capability runs the plan (maybe
    with less tuned kernels), which is logged, not refused.
    """
    problems = []
    if _major_minor(metadata.tensorrt_version) != _major_minor(env.tensorrt_version):
        problems.append(
            f"built with TensorRT {metadata.tensorrt_version}, this machine has TensorRT "
            f"{env.tensorrt_version}"
        )
    if metadata.compute_capability != env.compute_capability:
        problems.append(
            f"built for compute capability {metadata.compute_capability} "
            f"({metadata.gpu_name}), this GPU is {env.compute_capability} ({env.gpu_name})"
        )
    return problems


def check_compatible(metadata: PlanMetadata, env: GpuEnvironment, plan_name: str) -> None:
    """Raise ``ModelNotReady`` listing every mismatch; log a differing GPU name."""
    problems = compatibility_problems(metadata, env)
    if problems:
        raise ModelNotReady(
            f"TensorRT engine {plan_name} does not run on this machine: "
            + "; ".join(problems)
            + "; rebuild it here (TensorRT engines are not portable across TensorRT versions "
            "or compute capabilities)"
        )
    if metadata.gpu_name != env.gpu_name:
        log.warning(
            "%s was built on %s, running on %s (same compute capability %s); kernels may be "
            "less tuned",
            plan_name,
            metadata.gpu_name,
            env.gpu_name,
            env.compute_capability,
        )


def instance_device(config: mc.ModelConfig, instance_index: int) -> int:
    """The CUDA device of instance ``instance_index`` (numbered across instance groups, as the
    server creates ``sum(count)`` instances in group order).

    Within a group, instances go round-robin over its ``gpus`` (device 0 when none are
    listed). ``KIND_CPU``/``KIND_MODEL`` groups are refused: a TensorRT plan runs on a GPU.
    """
    groups = list(config.instance_group)
    if not groups:
        return 0
    index = instance_index % max(1, sum(max(g.count, 1) for g in groups))
    for group in groups:
        count = max(group.count, 1)
        if index < count:
            if group.kind not in (mc.ModelInstanceGroup.KIND_GPU, mc.ModelInstanceGroup.KIND_AUTO):
                kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
                raise RepositoryError(
                    f"instance_group {group.name or '#'} has kind {kind}; a tensorrt_plan runs "
                    "only on GPUs: use KIND_GPU"
                )
            gpus = list(group.gpus)
            return int(gpus[index % len(gpus)]) if gpus else 0
        index -= count
    return 0  # unreachable: index < total


def shape_fits(shape: Sequence[int], bounds: tuple[Shape, Shape, Shape]) -> bool:
    """True when ``min <= shape <= max`` dimension by dimension."""
    low, _opt, high = bounds
    return len(shape) == len(low) and all(
        lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)
    )


def select_profile(profiles: Sequence[ProfileShapes], shapes: Mapping[str, Sequence[int]]) -> int:
    """The first optimization profile whose ranges hold every input shape.

    ``InvalidInput`` naming the accepted ranges when none does (e.g. batch too large).
    """
    for index, profile in enumerate(profiles):
        if all(
            shape_fits(shapes[name], bounds) for name, bounds in profile.items() if name in shapes
        ):
            return index
    ranges = "; ".join(
        ", ".join(f"{n}: {list(b[0])}..{list(b[2])}" for n, b in profile.items())
        for profile in profiles
    )
    given = ", ".join(f"{n}: {list(s)}" for n, s in shapes.items())
    raise InvalidInput(
        f"input shapes ({given}) are outside every optimization profile of this TensorRT "
        f"engine (accepted: {ranges})"
    )


def max_input_shapes(profiles: Sequence[ProfileShapes]) -> dict[str, Shape]:
    """Per input, the elementwise maximum of the profiles' max shapes (buffer sizing)."""
    result: dict[str, Shape] = {}
    for profile in profiles:
        for name, (_low, _opt, high) in profile.items():
            if name in result:
                old = result[name]
                if len(old) != len(high):
                    raise RepositoryError(f"profiles disagree on the rank of input {name!r}")
                result[name] = tuple(max(a, b) for a, b in zip(old, high, strict=True))
            else:
                result[name] = tuple(high)
    return result


def buffer_bytes(shape: Sequence[int], datatype: str) -> int:
    """Bytes a device buffer needs for ``shape`` of v2 ``datatype`` (at least 1: CUDA wants a
    valid pointer even for empty tensors)."""
    if any(d < 0 for d in shape):
        raise RepositoryError(
            f"shape {list(shape)} still has a dynamic dimension; the engine needs an output "
            "allocator (data-dependent shapes are not supported)"
        )
    itemsize = V2_TO_NUMPY[datatype].itemsize
    return max(1, math.prod(shape) * itemsize)


def max_buffer_sizes(
    specs: Iterable[TensorSpec], shapes_per_profile: Sequence[Mapping[str, Sequence[int]]]
) -> dict[str, int]:
    """Per tensor, the largest byte size over the given shapes (one mapping per profile)."""
    sizes: dict[str, int] = {}
    for spec in specs:
        candidates = [buffer_bytes(s[spec.name], spec.datatype) for s in shapes_per_profile]
        if not candidates:
            raise RepositoryError(f"no shape known for tensor {spec.name!r}")
        sizes[spec.name] = max(candidates)
    return sizes


def probe_environment(device: int) -> GpuEnvironment:
    """TensorRT version and the GPU ``device``'s name and compute capability.

    ``ModelNotReady`` when TensorRT is not importable, torch has no CUDA, or the device does
    not exist.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ModelNotReady(
            f"tensorrt is not importable ({exc}); install the 'gpu' extra on a machine with "
            "an NVIDIA GPU to serve tensorrt_plan models"
        ) from None
    torch = _torch_cuda()
    count = torch.cuda.device_count()
    if device >= count:
        raise ModelNotReady(
            f"instance_group asks for GPU {device} but this machine has {count} CUDA device(s)"
        )
    major, minor = torch.cuda.get_device_capability(device)
    return GpuEnvironment(trt.__version__, f"{major}.{minor}", torch.cuda.get_device_name(device))


def _torch_cuda():
    try:
        import torch
    except ImportError as exc:
        raise ModelNotReady(f"torch is not importable ({exc}); it provides CUDA memory") from None
    if not torch.cuda.is_available():
        built = torch.version.cuda
        raise ModelNotReady(
            "no CUDA device is available"
            + ("" if built else " (this torch build has no CUDA support)")
            + "; tensorrt_plan models need an NVIDIA GPU"
        )
    return torch


class TensorRTEngine:
    """One deserialized TensorRT engine with one execution context on one GPU."""

    def __init__(
        self, model_file: Path, config: mc.ModelConfig, *, instance_index: int = 0
    ) -> None:
        model_file = Path(model_file)
        self.device_index = instance_device(config, instance_index)
        metadata = read_metadata(model_file)
        env = probe_environment(self.device_index)
        check_compatible(metadata, env, model_file.name)
        import tensorrt as trt

        torch = _torch_cuda()
        self._torch = torch
        self._trt = trt
        self.device = "gpu"
        self._lock = threading.Lock()
        logger = collecting_logger(trt)
        with torch.cuda.device(self.device_index):
            self._runtime = trt.Runtime(logger)
            engine = self._runtime.deserialize_cuda_engine(model_file.read_bytes())
            if engine is None:
                raise ModelNotReady(
                    f"TensorRT could not deserialize {model_file.name}: {logger.text()}"
                )
            self._engine = engine
            self._stream = torch.cuda.Stream(device=self.device_index)
            self._context = engine.create_execution_context()
            if self._context is None:
                raise ModelNotReady(f"TensorRT could not create a context: {logger.text()}")
            self._read_io(trt)
            self._allocate()

    def _read_io(self, trt: Any) -> None:
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs, outputs = [], []
        for name in names:
            spec = TensorSpec(
                name, trt_to_v2(engine.get_tensor_dtype(name)), tuple(engine.get_tensor_shape(name))
            )
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
            else:
                outputs.append(spec)
        self.inputs, self.outputs = inputs, outputs
        self._output_names = [o.name for o in outputs]
        self._output_set = set(self._output_names)
        self._dtypes = {s.name: V2_TO_NUMPY[s.datatype] for s in [*inputs, *outputs]}
        self._profiles: list[ProfileShapes] = []
        for index in range(engine.num_optimization_profiles):
            profile: ProfileShapes = {}
            for spec in inputs:
                if -1 in spec.shape:
                    low, opt, high = engine.get_tensor_profile_shape(spec.name, index)
                    profile[spec.name] = (tuple(low), tuple(opt), tuple(high))
                else:
                    profile[spec.name] = (spec.shape, spec.shape, spec.shape)
            self._profiles.append(profile)
        if not self._profiles:
            self._profiles.append({s.name: (s.shape, s.shape, s.shape) for s in inputs})

    def _allocate(self) -> None:
        """One device buffer per tensor, sized for the largest shape of any profile."""
        torch, context, handle = self._torch, self._context, self._stream.cuda_stream
        per_profile: list[dict[str, Shape]] = []
        for index, profile in enumerate(self._profiles):
            context.set_optimization_profile_async(index, handle)
            shapes: dict[str, Shape] = {}
            for name, (_low, _opt, high) in profile.items():
                context.set_input_shape(name, high)
                shapes[name] = tuple(high)
            for spec in self.outputs:
                shapes[spec.name] = tuple(context.get_tensor_shape(spec.name))
            per_profile.append(shapes)
        self._stream.synchronize()
        sizes = max_buffer_sizes([*self.inputs, *self.outputs], per_profile)
        self._buffers = {
            name: torch.empty(size, dtype=torch.uint8, device=f"cuda:{self.device_index}")
            for name, size in sizes.items()
        }
        for name, buffer in self._buffers.items():
            context.set_tensor_address(name, buffer.data_ptr())
        self._profile = len(self._profiles) - 1

    def infer(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = output_names or self._output_names
        unknown = [n for n in names if n not in self._output_set]
        missing = [s.name for s in self.inputs if s.name not in inputs]
        if missing or unknown:
            raise InvalidInput(
                f"TensorRT engine inputs missing: {missing}; unknown outputs: {unknown}"
            )
        arrays = {s.name: self._host_input(s, inputs[s.name]) for s in self.inputs}
        profile = select_profile(self._profiles, {n: a.shape for n, a in arrays.items()})
        torch = self._torch
        with self._lock, torch.cuda.device(self.device_index), torch.cuda.stream(self._stream):
            context, handle = self._context, self._stream.cuda_stream
            if profile != self._profile:
                context.set_optimization_profile_async(profile, handle)
                self._profile = profile
            for name, array in arrays.items():
                if array.nbytes:
                    host = torch.from_numpy(array.reshape(-1).view(np.uint8))
                    self._buffers[name][: array.nbytes].copy_(host, non_blocking=True)
                if not context.set_input_shape(name, array.shape):
                    raise InvalidInput(f"TensorRT rejected shape {list(array.shape)} for {name}")
            if not context.execute_async_v3(handle):
                raise EngineError("TensorRT execute_async_v3 failed (see the server log)")
            results: dict[str, np.ndarray] = {}
            for name in names:
                shape = tuple(context.get_tensor_shape(name))
                out = np.empty(shape, dtype=self._dtypes[name])
                if out.nbytes > self._buffers[name].numel():
                    raise EngineError(
                        f"output {name!r} shape {list(shape)} exceeds the buffer sized from the "
                        "optimization profiles"
                    )
                if out.nbytes:
                    host = torch.from_numpy(out.reshape(-1).view(np.uint8))
                    host.copy_(self._buffers[name][: out.nbytes], non_blocking=False)
                results[name] = out
            self._stream.synchronize()
        return results

    def _host_input(self, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
        dtype = self._dtypes[spec.name]
        if array.dtype != dtype:
            raise InvalidInput(
                f"input {spec.name!r} is {array.dtype}, the engine takes {spec.datatype}"
            )
        if len(array.shape) != len(spec.shape):
            raise InvalidInput(
                f"input {spec.name!r} has shape {list(array.shape)}, the engine takes rank "
                f"{len(spec.shape)} ({list(spec.shape)})"
            )
        return np.require(array, requirements=["C", "W"])

    def close(self) -> None:
        with self._lock:
            self._buffers = {}
            self._context = None
            self._engine = None
            self._runtime = None


def collecting_logger(trt: Any) -> Any:
    """A ``tensorrt.ILogger`` that keeps warnings and errors for refusal messages."""
    keep = {
        trt.ILogger.Severity.INTERNAL_ERROR,
        trt.ILogger.Severity.ERROR,
        trt.ILogger.Severity.WARNING,
    }

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in keep:
                self.messages.append(msg)
                log.warning("TensorRT: %s", msg)

        def text(self) -> str:
            return " | ".join(self.messages[-5:]) or "no message from TensorRT"

    return CollectingLogger()
