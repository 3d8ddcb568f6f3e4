"""OpenVINO through ONNX Runtime: the ``onnxruntime-ep-openvino`` plugin execution provider.

The plugin (the ``openvino`` extra) registers with the standard ``onnxruntime`` package through
ORT's EP ABI (``register_execution_provider_library`` / ``get_ep_devices`` /
``SessionOptions.add_provider_for_devices``); it bundles its own OpenVINO runtime. OpenVINO
runs NNCF's INT8 QDQ graphs with its own INT8 kernels (AMX / VNNI), which ORT's CPU provider
executes far slower (see bench/RESULTS.md, "INT8 routes").

Triton names this route ``optimization { execution_accelerators { cpu_execution_accelerator:
[ { name: "openvino" } ] } }``; its parameters are OpenVINO CPU properties (e.g.
``INFERENCE_PRECISION_HINT: "f32"``, ``NUM_STREAMS``), passed through the plugin's
``load_config``. One parameter is ours, not OpenVINO's: ``static_shapes`` (see
:func:`parse_static_shapes`) compiles extra static-shape copies of the model for the shapes a
deployment sends most.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

log = logging.getLogger(__name__)

EP_NAME = "OpenVINOExecutionProvider"
_REGISTRATION = "slimserve_openvino"
_LOCK = threading.Lock()
_REGISTERED: str | None = None  # the plugin library path once registered
STATIC_SHAPES = "static_shapes"
"""Accelerator parameter: shape sets to compile static-shape sessions for (not an OV property)."""
_SHAPE_ITEM = re.compile(r"\s*([^\[\],;\s]+)\s*\[([^\]]*)\]\s*(?:,|$)")


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


def parse_static_shapes(spec: str) -> list[dict[str, tuple[int, ...]]]:
    """The ``static_shapes`` parameter: shape sets separated by ``;``, each in the plugin's
    ``reshape_input`` form, e.g. ``"input_ids[8,128],attention_mask[8,128];input_ids[1,128],
    attention_mask[1,128]"``. Every dimension must be a positive integer. Raises ValueError
    with what is wrong."""
    sets: list[dict[str, tuple[int, ...]]] = []
    for text in (part.strip() for part in spec.split(";")):
        if not text:
            continue
        shapes: dict[str, tuple[int, ...]] = {}
        position = 0
        while position < len(text):
            match = _SHAPE_ITEM.match(text, position)
            if not match or match.end() == position:
                raise ValueError(
                    f"static_shapes: cannot read {text[position:]!r}; expected "
                    "name[d0,d1,...] items separated by ',' and sets separated by ';'"
                )
            name, dims_text = match.group(1), match.group(2)
            try:
                dims = tuple(int(d) for d in dims_text.split(","))
            except ValueError:
                dims = ()
            if not dims or any(d < 1 for d in dims):
                raise ValueError(
                    f"static_shapes: {name}[{dims_text}] needs positive integer dimensions"
                )
            if name in shapes:
                raise ValueError(f"static_shapes: {name} appears twice in one set")
            shapes[name] = dims
            position = match.end()
        sets.append(shapes)
    if not sets:
        raise ValueError("static_shapes: no shape set given")
    return sets


def reshape_input(shapes: dict[str, tuple[int, ...]]) -> str:
    """One shape set in the plugin's ``reshape_input`` provider-option form."""
    return ",".join(f"{name}[{','.join(map(str, dims))}]" for name, dims in shapes.items())


def add_openvino(
    options: Any,  # onnxruntime.SessionOptions
    parameters: dict[str, str] | None = None,
    threads: int | None = None,
    strict: bool = False,
    static_shape: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """Put the OpenVINO CPU device on ``options`` (ORT's CPU provider stays the fallback for
    nodes OpenVINO does not take, unless ``strict``); ``static_shape`` compiles the model for
    those input shapes only (OpenVINO's static-shape kernels: ~10-20% faster than the
    dynamic-shape compile for MiniLM INT8 at 8 x 128; other shapes then fail). Raises when the
    plugin is missing."""
    device = _device()
    if strict:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    properties = {k: v for k, v in (parameters or {}).items() if k != STATIC_SHAPES}
    config = {"load_config": json.dumps({"CPU": cpu_properties(properties, threads)})}
    if static_shape:
        config["reshape_input"] = reshape_input(static_shape)
    options.add_provider_for_devices([device], config)
