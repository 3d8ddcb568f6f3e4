"""OpenVINO through ONNX Runtime: the ``onnxruntime-ep-openvino`` plugin execution provider.

The plugin (the ``openvino`` extra) registers with the standard ``onnxruntime`` package through
ORT's EP ABI (``register_execution_provider_library`` / ``get_ep_devices`` /
``SessionOptions.add_provider_for_devices``); it bundles its own OpenVINO runtime. OpenVINO
runs NNCF's INT8 QDQ graphs with its own INT8 kernels (AMX / VNNI), which ORT's CPU provider
executes far slower (see bench/RESULTS.md, "INT8 routes").

Triton names this route ``optimization { execution_accelerators { cpu_execution_accelerator:
[ { name: "openvino" } ] } }``; its parameters are OpenVINO CPU properties (e.g.
``INFERENCE_PRECISION_HINT: "f32"``, ``NUM_STREAMS``), passed through the plugin's
``load_config``.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

EP_NAME = "OpenVINOExecutionProvider"
_REGISTRATION = "slimserve_openvino"
_LOCK = threading.Lock()
_REGISTERED: str | None = None  # the plugin library path once registered


def unavailable_reason() -> str | None:
    """None when the plugin can be used here, else why not (for logs and test skips)."""
    try:
        _device()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def available() -> bool:
    """Whether the OpenVINO plugin is installed and offers a CPU device."""
    return unavailable_reason() is None


def _device() -> Any:  # onnxruntime.OrtEpDevice
    """The plugin's OpenVINO CPU device (registering the plugin library once per process)."""
    global _REGISTERED
    import onnxruntime as ort

    try:
        import onnxruntime_ep_openvino as plugin
    except ImportError:
        raise ImportError(
            "onnxruntime-ep-openvino is not installed (pip install 'slimserve[openvino]')"
        ) from None
    with _LOCK:
        if _REGISTERED is None:
            ort.register_execution_provider_library(_REGISTRATION, plugin.get_library_path())
            _REGISTERED = plugin.get_library_path()
    devices = [
        d
        for d in ort.get_ep_devices()
        if d.ep_name == EP_NAME and d.ep_metadata.get("ov_device") == "CPU"
    ]
    if not devices:
        raise RuntimeError("the OpenVINO plugin offers no CPU device on this machine")
    return devices[0]


def cpu_properties(
    parameters: dict[str, str] | None = None, threads: int | None = None
) -> dict[str, str]:
    """OpenVINO CPU properties: latency hint, thread count, then ``parameters`` verbatim."""
    props = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        props["INFERENCE_NUM_THREADS"] = str(threads)
    props.update({str(k): str(v) for k, v in (parameters or {}).items()})
    return props


def add_openvino(
    options: Any,  # onnxruntime.SessionOptions
    parameters: dict[str, str] | None = None,
    threads: int | None = None,
    strict: bool = False,
) -> None:
    """Put the OpenVINO CPU device on ``options`` (ORT's CPU provider stays the fallback for
    nodes OpenVINO does not take, unless ``strict``). Raises when the plugin is missing."""
    device = _device()
    if strict:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    config = {"load_config": json.dumps({"CPU": cpu_properties(parameters, threads)})}
    options.add_provider_for_devices([device], config)
