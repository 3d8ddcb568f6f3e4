"""ONNX -> TensorRT ``model.plan`` (+ ``model.plan.json``), strongly typed, dynamic profiles.

Precision comes from the ONNX graph, never from builder flags (TensorRT 11 removed the
FP16/INT8 flags and implicit INT8 calibration): build an FP16-converted graph (FP32 I/O) or an
explicitly quantized (Q/DQ) one. ``profiles_for`` (pure) turns the request's batch size and
sequence length into optimization profiles; ``build_engine`` needs ``tensorrt`` and a GPU.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from serving.backends.base import TensorSpec
from serving.backends.tensorrt import (
    PlanMetadata,
    ProfileShapes,
    Shape,
    collecting_logger,
    probe_environment,
    trt_to_v2,
    write_metadata,
)
from serving.errors import InvalidInput
from serving.fileutil import atomic_write_bytes

PLAN_NAME = "model.plan"
DEFAULT_WORKSPACE_BYTES = 1 << 30


class EngineBuildError(RuntimeError):
    """TensorRT refused the model (parser or builder messages included)."""


def profiles_for(
    inputs: Sequence[tuple[str, Sequence[int]]],
    batch_size: int,
    max_batch: int,
    seq_len: int,
    max_seq: int,
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """One optimization profile: per input, ``(min, opt, max)`` shapes.

    Dynamic dims are ``-1``: dim 0 is the batch (``1 / batch_size / max_batch``), dim 1 the
    sequence (``1 / seq_len / max_seq``); static dims are fixed. Any other dynamic dim is an
    ``InvalidInput`` (fix it in the graph, e.g. the image size of a CNN).
    """
    if not 1 <= batch_size <= max_batch:
        raise InvalidInput(f"need 1 <= batch_size ({batch_size}) <= max_batch ({max_batch})")
    if not 1 <= seq_len <= max_seq:
        raise InvalidInput(f"need 1 <= seq_len ({seq_len}) <= max_seq ({max_seq})")
    ranges = {0: (1, batch_size, max_batch), 1: (1, seq_len, max_seq)}
    profile: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name, shape in inputs:
        low, opt, high = [], [], []
        for axis, dim in enumerate(shape):
            if dim >= 0:
                bounds = (dim, dim, dim)
            elif axis in ranges:
                bounds = ranges[axis]
            else:
                raise InvalidInput(
                    f"input {name!r} dim {axis} is dynamic; only the batch (0) and sequence (1) "
                    "dims may be: give the graph a fixed size there"
                )
            for target, value in zip((low, opt, high), bounds, strict=True):
                target.append(value)
        profile[name] = (tuple(low), tuple(opt), tuple(high))
    return profile


def network_flags(trt: Any, strongly_typed: bool) -> int:
    """``create_network`` flags: STRONGLY_TYPED when asked (TensorRT 11 ignores the flag as
    strong typing is always on; absent flags are skipped)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return (1 << int(flag)) if strongly_typed and flag is not None else 0


def parser_error_text(error: Any) -> str:
    """One ``IParserError`` as ``node <name> (<op>): <description>``."""

    def call(method: str) -> Any:
        fn = getattr(error, method, None)
        try:
            return fn() if callable(fn) else None
        except Exception:
            return None

    desc = call("desc") or str(error)
    name, op = call("node_name"), call("node_operator")
    if name or op:
        return f"node {name or call('node')} ({op or '?'}): {desc}"
    return desc


def build_engine(
    onnx_path: Path,
    out_dir: Path,
    *,
    profiles: ProfileShapes | Sequence[ProfileShapes],
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    strongly_typed: bool = True,
    timing_cache: Path | None = None,
    device: int = 0,
) -> Path:
    """Parse ``onnx_path`` with TensorRT's ONNX parser, build a (strongly typed) engine with
    the given optimization profiles on GPU ``device``, and write ``out_dir/model.plan`` and
    ``model.plan.json``. ``timing_cache`` is read when present and updated after the build.

    Raises ``EngineBuildError`` with the parser's/builder's messages, and ``ModelNotReady``
    (from the environment probe) without TensorRT or a GPU.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    profile_list = [profiles] if isinstance(profiles, Mapping) else list(profiles)
    env = probe_environment(device)
    import tensorrt as trt
    import torch

    logger = collecting_logger(trt)
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt, strongly_typed))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(
                f"TensorRT's ONNX parser rejected {onnx_path.name}: "
                + ("; ".join(errors) or logger.text())
            )
        inputs = [_tensor_spec(network.get_input(i)) for i in range(network.num_inputs)]
        outputs = [_tensor_spec(network.get_output(i)) for i in range(network.num_outputs)]
        _check_profiles(inputs, profile_list)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        dynamic = {s.name for s in inputs if -1 in s.shape}
        for shapes in profile_list:
            profile = builder.create_optimization_profile()
            for name, (low, opt, high) in shapes.items():
                if name in dynamic:  # static inputs need (and may take) no range
                    profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(profile)
        if timing_cache is not None:
            data = timing_cache.read_bytes() if timing_cache.is_file() else b""
            config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False)
        started = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"TensorRT could not build {onnx_path.name}: {logger.text()}")
        seconds = time.perf_counter() - started
        out_dir.mkdir(parents=True, exist_ok=True)
        plan = out_dir / PLAN_NAME
        atomic_write_bytes(plan, bytes(serialized))
        if timing_cache is not None:
            atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    metadata = PlanMetadata(
        tensorrt_version=env.tensorrt_version,
        compute_capability=env.compute_capability,
        gpu_name=env.gpu_name,
        profiles=[{n: tuple(map(tuple, s)) for n, s in p.items()} for p in profile_list],
        inputs=inputs,
        outputs=outputs,
        strongly_typed=strongly_typed,
        extra={
            "onnx_file": onnx_path.name,
            "onnx_sha256": _sha256(onnx_path),
            "workspace_bytes": int(workspace_bytes),
            "build_seconds": round(seconds, 3),
        },
    )
    write_metadata(plan, metadata)
    return plan


def _tensor_spec(tensor: Any) -> TensorSpec:
    return TensorSpec(tensor.name, trt_to_v2(tensor.dtype), tuple(int(d) for d in tensor.shape))


def _check_profiles(inputs: list[TensorSpec], profiles: list[ProfileShapes]) -> None:
    """Every dynamic input needs a range in every profile, only known inputs may have one, and
    each range must fit the input: same rank, static dims kept, ``min <= opt <= max``."""
    if not profiles:
        raise InvalidInput("at least one optimization profile is needed")
    specs = {s.name: s for s in inputs}
    for index, profile in enumerate(profiles):
        unknown = sorted(set(profile) - set(specs))
        if unknown:
            raise InvalidInput(
                f"profile {index} names unknown inputs {unknown}; inputs: {sorted(specs)}"
            )
        for spec in inputs:
            if spec.name in profile:
                _check_range(index, spec, profile[spec.name])
            elif -1 in spec.shape:
                raise InvalidInput(
                    f"profile {index} has no shape range for dynamic input {spec.name!r} "
                    f"{list(spec.shape)}"
                )


def _check_range(index: int, spec: TensorSpec, bounds: tuple[Shape, Shape, Shape]) -> None:
    where = f"profile {index}, input {spec.name!r} {list(spec.shape)}"
    if any(len(shape) != len(spec.shape) for shape in bounds):
        raise InvalidInput(f"{where}: every shape needs rank {len(spec.shape)}, got {bounds}")
    for axis, (dim, low, opt, high) in enumerate(zip(spec.shape, *bounds, strict=True)):
        if dim >= 0 and not low == opt == high == dim:
            raise InvalidInput(f"{where}: dim {axis} is fixed at {dim}, got {low}/{opt}/{high}")
        if not 0 <= low <= opt <= high:
            raise InvalidInput(
                f"{where}: dim {axis} needs 0 <= min <= opt <= max, got {low}/{opt}/{high}"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
