"""KServe v2 / Triton datatypes and their numpy, ONNX and config.pbtxt equivalents."""

from __future__ import annotations

import numpy as np

from serving.errors import InvalidInput

# v2 datatype -> numpy dtype. BYTES maps to object arrays of ``bytes``.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}

# config.pbtxt DataType enum names ("TYPE_FP32") <-> v2 names ("FP32").
CONFIG_TO_V2: dict[str, str] = {
    f"TYPE_{k}" if k != "BYTES" else "TYPE_STRING": k for k in V2_TO_NUMPY
}
V2_TO_CONFIG: dict[str, str] = {v: k for k, v in CONFIG_TO_V2.items()}

# ONNX TensorProto element types -> v2 names.
ONNX_TO_V2: dict[int, str] = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}

# ONNX Runtime type strings ("tensor(float)") -> v2 names.
ORT_TO_V2: dict[str, str] = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a v2 datatype name; ``InvalidInput`` if unknown."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        known = ", ".join(V2_TO_NUMPY)
        raise InvalidInput(f"unknown datatype '{datatype}'; expected one of {known}") from None


def v2_datatype(dtype: np.dtype) -> str:
    """The v2 datatype name of a numpy dtype (strings and bytes map to BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return NUMPY_TO_V2[dtype]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no KServe v2 datatype") from None


def element_size(datatype: str) -> int | None:
    """Bytes per element for fixed-size types, ``None`` for BYTES."""
    if datatype == "BYTES":
        return None
    return numpy_dtype(datatype).itemsize
