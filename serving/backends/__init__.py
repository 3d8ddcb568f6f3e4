"""Runtimes, one module per runtime, selected by the config's platform."""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from serving.backends.base import Engine, TensorSpec
from serving.errors import RepositoryError

__all__ = ["Engine", "TensorSpec", "load_engine"]


def load_engine(model_file: Path, config: mc.ModelConfig, *, instance_index: int = 0) -> Engine:
    """Load ``model_file`` with the runtime its config's platform names."""
    platform = config.platform or config.backend
    if platform in ("onnxruntime_onnx", "onnxruntime"):
        from serving.backends.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model_file, config, instance_index=instance_index)
    if platform in ("tensorrt_plan", "tensorrt"):
        from serving.backends.tensorrt import TensorRTEngine

        return TensorRTEngine(model_file, config, instance_index=instance_index)
    raise RepositoryError(
        f"platform '{platform}' is not supported; use onnxruntime_onnx or tensorrt_plan"
    )
