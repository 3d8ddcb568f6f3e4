"""ONNX Runtime engine: CPU by default, CUDA / TensorRT execution providers when configured,
OpenVINO (plugin EP) when ``cpu_execution_accelerator`` names it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.backends import openvino
from serving.backends.base import TensorSpec
from serving.datatypes import ORT_TO_V2
from serving.errors import EngineError, InvalidInput, ModelNotReady, RepositoryError

log = logging.getLogger(__name__)


def _parameter(config: mc.ModelConfig, key: str) -> str | None:
    if key in config.parameters:
        return config.parameters[key].string_value
    return None


def wants_gpu(config: mc.ModelConfig) -> bool:
    """True when the instance group asks for a GPU."""
    return any(group.kind == mc.ModelInstanceGroup.KIND_GPU for group in config.instance_group)


def gpu_device_id(config: mc.ModelConfig, instance_index: int) -> int:
    """The GPU this instance runs on (round-robin over ``instance_group.gpus``)."""
    for group in config.instance_group:
        if group.kind == mc.ModelInstanceGroup.KIND_GPU and group.gpus:
            return int(group.gpus[instance_index % len(group.gpus)])
    return 0


def provider_chain(
    config: mc.ModelConfig, model_dir: Path, instance_index: int = 0
) -> list[tuple[str, dict[str, str]]]:
    """Execution providers and their options from the config, most preferred first.

    GPU instance groups get CUDA (with exhaustive cuDNN conv algorithm search, so cuDNN's
    Winograd/FFT kernels are chosen by measurement), and the TensorRT provider in front of it
    when ``optimization.execution_accelerators.gpu_execution_accelerator`` names ``tensorrt``
    (its options are passed through; engine and timing caches live in the version folder).
    """
    if not wants_gpu(config):
        return [("CPUExecutionProvider", {})]
    device = str(gpu_device_id(config, instance_index))
    chain: list[tuple[str, dict[str, str]]] = []
    for accel in config.optimization.execution_accelerators.gpu_execution_accelerator:
        if accel.name == "tensorrt":
            options = {
                "device_id": device,
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(model_dir / "trt_cache"),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(model_dir / "trt_cache"),
            }
            for key, value in accel.parameters.items():
                mapped = {
                    "precision_mode": None,
                    "max_workspace_size_bytes": "trt_max_workspace_size",
                }.get(key, key)
                if key == "precision_mode":
                    options["trt_fp16_enable"] = str(value.upper() == "FP16")
                    options["trt_int8_enable"] = str(value.upper() == "INT8")
                elif mapped:
                    options[mapped] = value
            chain.append(("TensorrtExecutionProvider", options))
    cuda = {"device_id": device, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    algo = _parameter(config, "cudnn_conv_algo_search")
    if algo:
        cuda["cudnn_conv_algo_search"] = algo
    tf32 = _parameter(config, "use_tf32")  # "0": exact FP32 math (TF32 is on by default)
    if tf32:
        cuda["use_tf32"] = tf32
    chain.append(("CUDAExecutionProvider", cuda))
    chain.append(("CPUExecutionProvider", {}))
    return chain


def session_options(config: mc.ModelConfig):  # -> ort.SessionOptions
    """Thread counts, spinning and graph optimization level from the config's parameters.

    Intra-op thread spinning is off by default: spinning ORT threads starve the server's own
    Python threads on small machines (measured on 2 cores: ~8x more requests/s through the
    batcher with the demo CNN). The config parameter ``allow_spinning: "1"``
    turns it back on for a dedicated host. For a compute-heavy model on a small host,
    ``intra_op_thread_count: "1"`` with one instance per core (``instance_group.count``)
    needs no spinning at all. Parameters named ``session.*`` are onnxruntime session config
    keys and are passed through as given (e.g. ``session.intra_op.spin_duration_us``).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    spinning = _parameter(config, "allow_spinning") or "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    for key, value in config.parameters.items():
        if key.startswith("session."):  # onnxruntime's own session config keys, verbatim
            options.add_session_config_entry(key, value.string_value)
    intra = _parameter(config, "intra_op_thread_count")
    inter = _parameter(config, "inter_op_thread_count")
    if intra:
        options.intra_op_num_threads = int(intra)
    if inter:
        options.inter_op_num_threads = int(inter)
    level = _parameter(config, "graph_optimization_level")
    if level:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return options


def cpu_accelerator(config: mc.ModelConfig, options) -> str | None:  # ort.SessionOptions
    """Add the ``cpu_execution_accelerator`` the config names to ``options``; its name, or
    None (plain CPU provider). ``openvino`` is ONNX Runtime's OpenVINO plugin EP (see
    ``serving.backends.openvino``; its parameters are OpenVINO CPU properties); when the plugin
    is not installed the model runs on the CPU provider and a warning says so."""
    for accel in config.optimization.execution_accelerators.cpu_execution_accelerator:
        if accel.name != "openvino":
            log.warning("%s: unknown cpu_execution_accelerator %r ignored", config.name, accel.name)
            continue
        intra = _parameter(config, "intra_op_thread_count")
        try:
            openvino.add_openvino(options, dict(accel.parameters), int(intra) if intra else None)
        except Exception as exc:
            log.warning(
                "%s: cpu_execution_accelerator 'openvino' unavailable (%s); "
                "running on ONNX Runtime's CPU provider",
                config.name,
                exc,
            )
            return None
        log.info("%s: cpu_execution_accelerator 'openvino' (ONNX Runtime plugin EP)", config.name)
        return "openvino"
    return None


def openvino_accelerator(config: mc.ModelConfig):  # -> mc ExecutionAccelerator | None
    """The config's ``cpu_execution_accelerator { name: "openvino" }`` entry, if any."""
    accelerators = config.optimization.execution_accelerators.cpu_execution_accelerator
    return next((accel for accel in accelerators if accel.name == "openvino"), None)


def openvino_static_shapes(config: mc.ModelConfig) -> list[dict[str, tuple[int, ...]]]:
    """The ``static_shapes`` parameter of the ``openvino`` accelerator, parsed (empty when
    absent); a malformed value is a repository error that names the model."""
    accel = openvino_accelerator(config)
    if accel is None or openvino.STATIC_SHAPES not in accel.parameters:
        return []
    try:
        return openvino.parse_static_shapes(accel.parameters[openvino.STATIC_SHAPES])
    except ValueError as exc:
        raise RepositoryError(f"{config.name}: {exc}") from None


class OnnxRuntimeEngine:
    """One ``onnxruntime.InferenceSession`` for one model instance (plus, on the ``openvino``
    accelerator with ``static_shapes``, one static-shape session per listed shape set: a
    request whose inputs have exactly one of those shapes runs there, any other on the
    dynamic-shape session)."""

    def __init__(
        self, model_file: Path, config: mc.ModelConfig, *, instance_index: int = 0
    ) -> None:
        import onnxruntime as ort

        chain = provider_chain(config, model_file.parent, instance_index)
        available = set(ort.get_available_providers())
        wanted = [name for name, _ in chain]
        missing = [name for name in wanted if name not in available]
        if wants_gpu(config) and "CUDAExecutionProvider" in missing:
            raise ModelNotReady(
                "config asks for a GPU (instance_group KIND_GPU) but this onnxruntime has no "
                f"CUDAExecutionProvider (available: {sorted(available)}); install the 'gpu' extra "
                "on a machine with CUDA, or use KIND_CPU"
            )
        providers = [(name, opts) for name, opts in chain if name in available]
        options = session_options(config)
        static_sets = [] if wants_gpu(config) else openvino_static_shapes(config)
        self.accelerator = None if wants_gpu(config) else cpu_accelerator(config, options)
        try:
            if self.accelerator:  # plugin EP on the options; CPU provider as its fallback
                self.session = ort.InferenceSession(str(model_file), sess_options=options)
            else:
                self.session = ort.InferenceSession(
                    str(model_file), sess_options=options, providers=providers
                )
        except Exception as exc:
            raise RepositoryError(f"onnxruntime could not load {model_file.name}: {exc}") from None
        active = self.session.get_providers()
        if wants_gpu(config) and "CUDAExecutionProvider" not in active:
            # onnxruntime-gpu silently falls back to CPU when CUDA libraries are missing.
            raise ModelNotReady(
                f"CUDAExecutionProvider was requested but the session runs on {active}: "
                "CUDA/cuDNN libraries are probably missing"
            )
        self.providers = active
        self.device = "gpu" if "CUDAExecutionProvider" in active else "cpu"
        self.inputs = [self._spec(i) for i in self.session.get_inputs()]
        self.outputs = [self._spec(o) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self._string_inputs = {i.name for i in self.inputs if i.datatype == "BYTES"}
        self._string_outputs = {o.name for o in self.outputs if o.datatype == "BYTES"}
        self.static_sessions: list[tuple[dict[str, tuple[int, ...]], object]] = []
        if static_sets and self.accelerator != "openvino":
            log.warning("%s: static_shapes ignored (OpenVINO is not in use)", config.name)
        elif static_sets:
            for shapes in static_sets:
                self._check_static_shape(config.name, shapes)
                self.static_sessions.append(
                    (shapes, self._static_session(model_file, config, shapes))
                )
            log.info(
                "%s: OpenVINO static-shape sessions for %s",
                config.name,
                "; ".join(openvino.reshape_input(shapes) for shapes, _ in self.static_sessions),
            )

    def _check_static_shape(self, model: str, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every named input exists, with that rank and compatible fixed dimensions."""
        specs = {spec.name: spec for spec in self.inputs}
        for name, dims in shapes.items():
            spec = specs.get(name)
            if spec is None:
                raise RepositoryError(
                    f"{model}: static_shapes names input {name!r}; the model's inputs are "
                    f"{sorted(specs)}"
                )
            if len(dims) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, dims, strict=True)
            ):
                raise RepositoryError(
                    f"{model}: static_shapes gives {name} the shape {list(dims)}, which the "
                    f"model's input shape {list(spec.shape)} does not allow"
                )

    @staticmethod
    def _static_session(model_file: Path, config: mc.ModelConfig, shapes):
        """An OpenVINO session compiled for exactly ``shapes``."""
        import onnxruntime as ort

        options = session_options(config)
        intra = _parameter(config, "intra_op_thread_count")
        try:
            openvino.add_openvino(
                options,
                dict(openvino_accelerator(config).parameters),
                int(intra) if intra else None,
                static_shape=shapes,
            )
            return ort.InferenceSession(str(model_file), sess_options=options)
        except Exception as exc:
            raise RepositoryError(
                f"{config.name}: OpenVINO could not compile {model_file.name} for the static "
                f"shape {openvino.reshape_input(shapes)}: {exc}"
            ) from None

    def session_for(self, inputs: dict[str, np.ndarray]):  # -> onnxruntime.InferenceSession
        """The static-shape session whose shapes ``inputs`` match exactly, else the dynamic."""
        for shapes, session in self.static_sessions:
            if all(
                name in inputs and tuple(inputs[name].shape) == dims
                for name, dims in shapes.items()
            ):
                return session
        return self.session

    @staticmethod
    def _spec(node) -> TensorSpec:  # node: onnxruntime.NodeArg
        dims = tuple(d if isinstance(d, int) else -1 for d in node.shape)
        return TensorSpec(node.name, ORT_TO_V2.get(node.type, "BYTES"), dims)

    def infer(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = output_names or self._output_names
        if self._string_inputs:
            inputs = {
                name: _to_ort_strings(name, array) if name in self._string_inputs else array
                for name, array in inputs.items()
            }
        try:
            results = self.session_for(inputs).run(names, inputs)
        except Exception as exc:
            message = str(exc)
            if (
                "INVALID_ARGUMENT" in message
                or "Invalid" in message
                or "missing from input feed" in message
            ):
                raise InvalidInput(f"onnxruntime rejected the input: {message}") from None
            raise EngineError(f"onnxruntime failed: {message}") from None
        outputs = dict(zip(names, results, strict=True))
        for name in self._string_outputs.intersection(outputs):
            outputs[name] = _to_bytes(outputs[name])
        return outputs

    def close(self) -> None:
        self.session = None
        self.static_sessions = []


def _to_ort_strings(name: str, array: np.ndarray) -> np.ndarray:
    """BYTES (object arrays of ``bytes``) as ONNX Runtime string tensors (UTF-8 ``str``).

    onnxruntime turns a ``bytes`` element into its ``repr`` ("b'..'"), so decode first.
    """
    if array.dtype.kind == "U":
        return array
    flat = array.reshape(-1).tolist()
    out = np.empty(len(flat), dtype=object)
    for index, item in enumerate(flat):
        if isinstance(item, (bytes, bytearray, memoryview)):
            try:
                out[index] = bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"input '{name}': BYTES element {index} is not UTF-8; ONNX Runtime string "
                    "tensors carry UTF-8 text only"
                ) from None
        else:
            out[index] = str(item)
    return out.reshape(array.shape)


def _to_bytes(array: np.ndarray) -> np.ndarray:
    """ONNX Runtime string outputs (``str``) as BYTES (object arrays of UTF-8 ``bytes``)."""
    flat = array.reshape(-1).tolist()
    out = np.empty(len(flat), dtype=object)
    out[:] = [item.encode("utf-8") if isinstance(item, str) else item for item in flat]
    return out.reshape(array.shape)
