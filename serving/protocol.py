"""KServe v2 inference requests and responses: JSON tensors and Triton's binary extension.

Pure functions, no web framework: the HTTP layer hands in the raw body and headers and
gets back arrays, or a body plus headers to send. Every client mistake raises
``InvalidInput`` (400) or ``PayloadTooLarge`` (413) with a message naming the tensor.

Wire format (as ``tritonclient.http`` writes and reads it): a JSON header of
``Inference-Header-Content-Length`` bytes, then the raw bytes of every tensor whose
``parameters.binary_data_size`` is set, in tensor order. Fixed-size types are row-major
little-endian; BYTES elements are a 4-byte little-endian length followed by the bytes.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from serving.backends.base import TensorSpec
from serving.datatypes import V2_TO_NUMPY, v2_datatype
from serving.errors import InvalidInput, PayloadTooLarge

JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"

_KNOWN = ", ".join(V2_TO_NUMPY)
_INT_KINDS = ("i", "u")
_ORJSON_NUMPY = orjson.OPT_SERIALIZE_NUMPY
# numpy dtypes orjson serializes natively (others go through tolist()).
_ORJSON_DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8,
        np.uint64, np.uint32, np.uint16, np.uint8, np.bool_,
    )
)  # fmt: skip


@dataclass
class ProtocolLimits:
    """Size limits applied while decoding; the server settings configure them."""

    max_body_bytes: int = 256 * 2**20
    max_decompressed_bytes: int = 256 * 2**20  # gzip/deflate bombs
    max_elements: int = 64 * 2**20  # per tensor / per request
    max_inputs: int = 64
    max_string_bytes: int = 16 * 2**20


@dataclass
class InputTensor:
    """One decoded input: ``data`` already has ``shape`` and the datatype's numpy dtype.

    ``from_json`` is True when the values came as JSON numbers (so ``check_inputs`` may
    convert them losslessly to the model's datatype); binary tensors must match exactly.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    from_json: bool = False


@dataclass
class OutputRequest:
    """A requested output; ``binary_data`` None means "use the request's default"."""

    name: str
    binary_data: bool | None = None


@dataclass
class InferenceRequest:
    """A decoded ``POST .../infer`` body."""

    id: str | None
    inputs: list[InputTensor]
    outputs: list[OutputRequest] | None  # None = all model outputs
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def priority(self) -> int:
        """``parameters.priority``; 0 means the model's default priority level."""
        return int(self.parameters.get("priority", 0))

    @property
    def timeout_us(self) -> int | None:
        """``parameters.timeout`` in microseconds, None when not given (or 0)."""
        value = self.parameters.get("timeout")
        return int(value) if value else None

    @property
    def binary_data_output(self) -> bool:
        """``parameters.binary_data_output``: default for outputs without ``binary_data``."""
        return bool(self.parameters.get("binary_data_output", False))

    @property
    def output_names(self) -> list[str] | None:
        """Names of the requested outputs, None for all."""
        return None if self.outputs is None else [o.name for o in self.outputs]


# ---------------------------------------------------------------------------- compression


def decompress_body(body: bytes, content_encoding: str | None, limits: ProtocolLimits) -> bytes:
    """Undo ``Content-Encoding`` gzip/deflate, stopping at ``max_decompressed_bytes``."""
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(
            f"request body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}"
        )
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding in ("gzip", "x-gzip"):
        return _inflate(body, 16 + zlib.MAX_WBITS, "gzip", limits.max_decompressed_bytes)
    if encoding == "deflate":
        # RFC 9110 "deflate" is the zlib format; some clients send raw deflate streams.
        zlib_header = len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] * 256 + body[1]) % 31 == 0
        wbits = zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
        return _inflate(body, wbits, "deflate", limits.max_decompressed_bytes)
    raise InvalidInput(
        f"unsupported Content-Encoding '{content_encoding}'; use gzip, deflate or identity"
    )


def _inflate(body: bytes, wbits: int, name: str, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    data = body
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            while data:
                chunk = inflater.decompress(data, limit + 1 - total)
                total += len(chunk)
                chunks.append(chunk)
                if total > limit:
                    raise PayloadTooLarge(
                        f"{name} body decompresses to more than the limit of {limit} bytes"
                    )
                data = inflater.unconsumed_tail
                if inflater.eof:
                    break
            chunk = inflater.flush()
        except zlib.error as exc:
            raise InvalidInput(f"request body is not valid {name} data: {exc}") from None
        total += len(chunk)
        chunks.append(chunk)
        if total > limit:
            raise PayloadTooLarge(
                f"{name} body decompresses to more than the limit of {limit} bytes"
            )
        if not inflater.eof:
            raise InvalidInput(f"{name} request body is truncated")
        data = inflater.unused_data
        if not data or wbits != 16 + zlib.MAX_WBITS:  # only gzip has multiple members
            break
    if data:
        raise InvalidInput(f"{len(data)} unexpected bytes after the end of the {name} stream")
    return b"".join(chunks)


def compress_body(
    body: bytes, accept_encoding: str | None, *, min_size: int = 1024, level: int = 1
) -> tuple[bytes, str | None]:
    """Compress for the client's ``Accept-Encoding`` (gzip preferred, then deflate).

    Returns the body and the ``Content-Encoding`` to send (None: sent as is). Bodies
    smaller than ``min_size`` are not worth compressing and go out unchanged.
    """
    if not accept_encoding or len(body) < min_size:
        return body, None
    choice = _choose_encoding(accept_encoding)
    if choice == "gzip":
        compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    elif choice == "deflate":
        compressor = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS)
    else:
        return body, None
    return compressor.compress(body) + compressor.flush(), choice


def _choose_encoding(accept_encoding: str) -> str | None:
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        coding = coding.strip().lower()
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if coding:
            weights[coding] = q
    star = weights.get("*", 0.0)
    best, best_q = None, 0.0
    for coding in ("gzip", "deflate"):
        q = weights.get(coding, weights.get("x-gzip", star) if coding == "gzip" else star)
        if q > best_q:
            best, best_q = coding, q
    return best


# ------------------------------------------------------------------------------- decoding


def decode_infer_request(
    body: bytes, *, header_length: int | None, limits: ProtocolLimits
) -> InferenceRequest:
    """Decode an infer request body (already decompressed) into arrays.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (None when absent:
    the whole body is JSON).
    """
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(
            f"request body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}"
        )
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if not isinstance(header_length, int) or isinstance(header_length, bool):
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header_length!r}")
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(
                f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes"
            )
        view = memoryview(body)
        header, binary = view[:header_length], view[header_length:]
    doc = _parse_json(header)
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _parameters(doc.get("parameters"), "request")
    _check_request_parameters(parameters)

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request needs a non-empty 'inputs' list")
    if len(raw_inputs) > limits.max_inputs:
        raise PayloadTooLarge(
            f"request has {len(raw_inputs)} inputs; the limit is {limits.max_inputs}"
        )
    inputs: list[InputTensor] = []
    seen: set[str] = set()
    offset = 0
    total_elements = 0
    for raw in raw_inputs:
        try:
            tensor, offset = _decode_input(raw, binary, offset, header_length is not None, limits)
        except RecursionError:
            raise InvalidInput("an input's 'data' is nested too deeply") from None
        if tensor.name in seen:
            raise InvalidInput(f"input '{tensor.name}' appears more than once")
        seen.add(tensor.name)
        total_elements += tensor.data.size
        if total_elements > limits.max_elements:
            raise PayloadTooLarge(
                f"request has more than {limits.max_elements} elements in all its inputs"
            )
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data follow the inputs' "
            "binary_data_size total; the body and the sizes disagree"
        )
    return InferenceRequest(
        id=request_id,
        inputs=inputs,
        outputs=_decode_outputs(doc.get("outputs")),
        parameters=parameters,
    )


def _parse_json(data: bytes | memoryview) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as first:
        if "depth" in str(first):  # no retry: Python 3.12's json would parse 5000 levels
            raise InvalidInput(f"request header is not valid JSON: {first}") from None
        # orjson is strict JSON; tritonclient (rapidjson) writes NaN / Infinity literals.
        try:
            text = bytes(data).decode("utf-8")
            return json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise InvalidInput(f"request header is not valid JSON: {first}") from None


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} 'parameters' must be a JSON object")
    return value


def _check_request_parameters(parameters: dict[str, Any]) -> None:
    for key in ("priority", "timeout"):
        value = parameters.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise InvalidInput(f"request parameter '{key}' must be a non-negative integer")
    value = parameters.get("binary_data_output")
    if value is not None and not isinstance(value, bool):
        raise InvalidInput("request parameter 'binary_data_output' must be true or false")


def _decode_outputs(value: Any) -> list[OutputRequest] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInput("'outputs' must be a list of {\"name\": ...} objects")
    outputs: list[OutputRequest] = []
    seen: set[str] = set()
    for raw in value:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidInput("every entry of 'outputs' needs a string 'name'")
        name = raw["name"]
        if name in seen:
            raise InvalidInput(f"output '{name}' is requested more than once")
        seen.add(name)
        params = _parameters(raw.get("parameters"), f"output '{name}'")
        if params.get("classification"):
            raise InvalidInput(f"output '{name}': the classification extension is not supported")
        if "shared_memory_region" in params:
            raise InvalidInput(f"output '{name}': shared memory is not supported")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(f"output '{name}': 'binary_data' must be true or false")
        outputs.append(OutputRequest(name, binary))
    return outputs


def _decode_shape(raw: Any, name: str, limits: ProtocolLimits) -> tuple[tuple[int, ...], int]:
    if not isinstance(raw, list):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of integers")
    for dim in raw:
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise InvalidInput(f"input '{name}': shape {raw} has a non-integer dimension")
        if dim < 0:
            raise InvalidInput(f"input '{name}': shape {raw} has a negative dimension")
    count = math.prod(raw)
    if count > limits.max_elements:
        raise PayloadTooLarge(
            f"input '{name}': shape {raw} has {count} elements; the limit is {limits.max_elements}"
        )
    return tuple(raw), count


def _decode_input(
    raw: Any, binary: memoryview, offset: int, has_binary: bool, limits: ProtocolLimits
) -> tuple[InputTensor, int]:
    if not isinstance(raw, dict):
        raise InvalidInput("every entry of 'inputs' must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("every input needs a non-empty string 'name'")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
        raise InvalidInput(
            f"input '{name}': unknown datatype {datatype!r}; expected one of {_KNOWN}"
        )
    shape, count = _decode_shape(raw.get("shape"), name, limits)
    params = _parameters(raw.get("parameters"), f"input '{name}'")
    if "shared_memory_region" in params:
        raise InvalidInput(f"input '{name}': shared memory is not supported; send the data")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in raw:
            raise InvalidInput(f"input '{name}' has both 'data' and binary_data_size")
        if not has_binary:
            raise InvalidInput(
                f"input '{name}' has binary_data_size but the request has no {HEADER_LENGTH} header"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(
                f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}"
            )
        if size > len(binary) - offset:
            raise InvalidInput(
                f"input '{name}': binary_data_size {size} runs past the end of the body "
                f"({len(binary) - offset} bytes left)"
            )
        chunk = binary[offset : offset + size]
        data = _decode_binary(chunk, name, datatype, shape, count, limits)
        return InputTensor(name, datatype, shape, data), offset + size
    if "data" not in raw:
        raise InvalidInput(f"input '{name}' has neither 'data' nor binary_data_size")
    data = _decode_json_data(raw["data"], name, datatype, shape, count, limits)
    return InputTensor(name, datatype, shape, data, from_json=True), offset


def _decode_binary(
    chunk: memoryview,
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    count: int,
    limits: ProtocolLimits,
) -> np.ndarray:
    if datatype == "BYTES":
        return _decode_bytes_elements(chunk, name, shape, count, limits)
    dtype = V2_TO_NUMPY[datatype]
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise InvalidInput(
            f"input '{name}': binary_data_size is {len(chunk)} bytes but shape {list(shape)} "
            f"of {datatype} needs {expected}"
        )
    array = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    if not array.flags.aligned:
        array = array.copy()
    return array


def _decode_bytes_elements(
    chunk: memoryview, name: str, shape: tuple[int, ...], count: int, limits: ProtocolLimits
) -> np.ndarray:
    items: list[bytes] = []
    pos, end = 0, len(chunk)
    unpack = struct.Struct("<I").unpack_from
    while pos < end:
        if end - pos < 4:
            raise InvalidInput(
                f"input '{name}': BYTES element {len(items)} is truncated (length prefix "
                f"needs 4 bytes, {end - pos} left)"
            )
        (length,) = unpack(chunk, pos)
        pos += 4
        if length > limits.max_string_bytes:
            raise PayloadTooLarge(
                f"input '{name}': BYTES element {len(items)} has {length} bytes; the limit "
                f"is {limits.max_string_bytes}"
            )
        if length > end - pos:
            raise InvalidInput(
                f"input '{name}': BYTES element {len(items)} claims {length} bytes but only "
                f"{end - pos} are left"
            )
        items.append(bytes(chunk[pos : pos + length]))
        pos += length
        if len(items) > count:
            break
    if len(items) != count:
        raise InvalidInput(
            f"input '{name}': shape {list(shape)} needs {count} BYTES elements but the "
            f"binary data holds {'more' if len(items) > count else len(items)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def _decode_json_data(
    data: Any,
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    count: int,
    limits: ProtocolLimits,
) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidInput(f"input '{name}': 'data' must be a list (flat or nested)")
    dtype = V2_TO_NUMPY[datatype]
    if count == 0:
        if _flat_len(data) != 0:
            raise InvalidInput(f"input '{name}': shape {list(shape)} has no elements but data does")
        return np.empty(shape, dtype=dtype)
    if datatype == "BYTES":
        return _json_bytes(data, name, shape, count, limits)
    try:
        inferred = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(
            f"input '{name}': nested 'data' is ragged; every row must have the same length"
        ) from None
    _check_layout(inferred, name, shape, count)
    kind = inferred.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidInput(f"input '{name}': BOOL data must be true/false values")
        return inferred.reshape(shape)
    if dtype.kind in _INT_KINDS:
        if kind == "i" or kind == "u":
            info = np.iinfo(dtype)
            low, high = inferred.min(), inferred.max()
            if low < info.min or high > info.max:
                raise InvalidInput(
                    f"input '{name}': value {low if low < info.min else high} does not fit "
                    f"{datatype} [{info.min}, {info.max}]"
                )
            return inferred.astype(dtype, copy=False).reshape(shape)
        return _json_ints_slow(data, name, datatype, dtype, shape)
    # float types: ints and floats are fine, anything else is not a number. (As in Python,
    # a true/false mixed into a list of numbers counts as 1/0: checking every element in
    # Python would cost more than decoding.)
    if kind not in ("f", "i", "u"):
        if kind == "b":
            raise InvalidInput(f"input '{name}': {datatype} data holds true/false values")
        raise InvalidInput(
            f"input '{name}': {datatype} data holds non-numeric (or out of range) values"
        )
    if dtype.itemsize < 8 and (kind == "f" or dtype.itemsize == 2):
        limit = _FLOAT_MAX[datatype]
        if not _surely_in_range(data, inferred, limit):
            _check_float_range(inferred, name, datatype, limit)
    result = inferred.astype(dtype, copy=False)
    return result.reshape(shape)


_FLOAT_MAX = {"FP16": float(np.finfo(np.float16).max), "FP32": float(np.finfo(np.float32).max)}


def _surely_in_range(data: list, values: np.ndarray, limit: float) -> bool:
    """A cheap test that every value is within +-limit (False: check precisely).

    Small flat lists: Python's min/max, cheaper than numpy's per-call overhead (they skip
    NaN unless it comes first, and inf fails the test). Otherwise the peak magnitude.
    """
    if values.ndim == 1 and len(data) <= 256:
        return -limit <= min(data) and max(data) <= limit
    return bool(np.abs(values).max() <= limit)


def _check_float_range(values: np.ndarray, name: str, datatype: str, limit: float) -> None:
    """Refuse finite values beyond the float type's range (they would become inf)."""
    finite = values[np.isfinite(values)]
    if finite.size and np.abs(finite).max() > limit:
        value = finite[np.abs(finite) > limit][0]
        raise InvalidInput(f"input '{name}': value {value} overflows {datatype}")


def _check_layout(array: np.ndarray, name: str, shape: tuple[int, ...], count: int) -> None:
    if array.ndim > 1 and array.shape != shape:
        raise InvalidInput(
            f"input '{name}': nested data has shape {list(array.shape)} but the declared "
            f"shape is {list(shape)}"
        )
    if array.dtype.kind == "O":
        return  # mixed or ragged content: the type check names the problem
    if array.size != count:
        raise InvalidInput(
            f"input '{name}': shape {list(shape)} needs {count} elements but data has {array.size}"
        )


def _flat_len(data: list) -> int:
    return sum(_flat_len(x) if isinstance(x, list) else 1 for x in data)


def _flatten(data: list, name: str, shape: tuple[int, ...]) -> list:
    """Flatten nested lists, checking the nesting matches ``shape`` (or is flat)."""
    if not any(isinstance(x, list) for x in data):
        return data
    out: list = []

    def walk(node: list, depth: int) -> None:
        if depth >= len(shape) or len(node) != shape[depth]:
            raise InvalidInput(f"input '{name}': nested data does not match shape {list(shape)}")
        for x in node:
            if isinstance(x, list):
                walk(x, depth + 1)
            elif depth != len(shape) - 1:
                raise InvalidInput(
                    f"input '{name}': nested data does not match shape {list(shape)}"
                )
            else:
                out.append(x)

    walk(data, 0)
    return out


def _json_ints_slow(
    data: list, name: str, datatype: str, dtype: np.dtype, shape: tuple[int, ...]
) -> np.ndarray:
    flat = _flatten(data, name, shape)
    if len(flat) != math.prod(shape):
        raise InvalidInput(
            f"input '{name}': shape {list(shape)} needs {math.prod(shape)} elements but data "
            f"has {len(flat)}"
        )
    for value in flat:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidInput(f"input '{name}': {datatype} data holds non-integer value {value!r}")
    try:
        return np.array(flat, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InvalidInput(f"input '{name}': a value does not fit {datatype}") from None


def _json_bytes(
    data: list, name: str, shape: tuple[int, ...], count: int, limits: ProtocolLimits
) -> np.ndarray:
    flat = _flatten(data, name, shape)
    if len(flat) != count:
        raise InvalidInput(
            f"input '{name}': shape {list(shape)} needs {count} elements but data has {len(flat)}"
        )
    items: list[bytes] = []
    for value in flat:
        if not isinstance(value, str):
            raise InvalidInput(
                f"input '{name}': BYTES data must be strings, got {type(value).__name__}"
            )
        encoded = value.encode("utf-8")
        if len(encoded) > limits.max_string_bytes:
            raise PayloadTooLarge(
                f"input '{name}': a BYTES element has {len(encoded)} bytes; the limit is "
                f"{limits.max_string_bytes}"
            )
        items.append(encoded)
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


# ----------------------------------------------------------------------------- validation


def check_inputs(
    request: InferenceRequest, specs: list[TensorSpec], max_batch_size: int
) -> dict[str, np.ndarray]:
    """Match the request's inputs against the model's: names, datatypes, shapes, batch.

    ``specs`` shapes include the batch dimension when ``max_batch_size > 0`` (``-1`` is
    any size). JSON-decoded values are converted to the model's datatype when that loses
    nothing; binary data must already have it. Returns the arrays for the engine.
    """
    by_name = {spec.name: spec for spec in specs}
    given = {tensor.name for tensor in request.inputs}
    expected = ", ".join(f"'{s.name}'" for s in specs) or "none"
    for tensor in request.inputs:
        if tensor.name not in by_name:
            raise InvalidInput(
                f"unknown input '{tensor.name}'; the model expects inputs {expected}"
            )
    missing = [s.name for s in specs if s.name not in given]
    if missing:
        raise InvalidInput(
            f"missing input(s) {', '.join(repr(m) for m in missing)}; the model expects "
            f"inputs {expected}"
        )
    arrays: dict[str, np.ndarray] = {}
    batch: int | None = None
    batch_from = ""
    for tensor in request.inputs:
        spec = by_name[tensor.name]
        array = _convert(tensor, spec)
        shape = tensor.shape
        if len(shape) != len(spec.shape) or any(
            want != -1 and want != got for want, got in zip(spec.shape, shape, strict=True)
        ):
            raise InvalidInput(
                f"input '{tensor.name}' has shape {list(shape)} but the model expects "
                f"{list(spec.shape)} (-1 is any size)"
            )
        if max_batch_size > 0:
            rows = shape[0]
            if rows < 1 or rows > max_batch_size:
                raise InvalidInput(
                    f"input '{tensor.name}' has batch size {rows}; it must be between 1 and "
                    f"the model's max_batch_size {max_batch_size}"
                )
            if batch is None:
                batch, batch_from = rows, tensor.name
            elif rows != batch:
                raise InvalidInput(
                    f"inputs disagree on the batch size: '{batch_from}' has {batch} rows, "
                    f"'{tensor.name}' has {rows}"
                )
        arrays[tensor.name] = array
    return arrays


def _convert(tensor: InputTensor, spec: TensorSpec) -> np.ndarray:
    if tensor.datatype == spec.datatype:
        return tensor.data
    mismatch = InvalidInput(
        f"input '{tensor.name}' has datatype {tensor.datatype} but the model expects "
        f"{spec.datatype}"
    )
    if not tensor.from_json or "BYTES" in (tensor.datatype, spec.datatype):
        raise mismatch
    target = V2_TO_NUMPY[spec.datatype]
    source = tensor.data
    if np.can_cast(source.dtype, target, "safe"):
        return source.astype(target)
    with np.errstate(all="ignore"):
        converted = source.astype(target)
        back = converted.astype(source.dtype)
    same = back == source
    if source.dtype.kind == "f":
        same |= np.isnan(source) & np.isnan(back)
    if not same.all():
        raise InvalidInput(
            f"input '{tensor.name}' has datatype {tensor.datatype} but the model expects "
            f"{spec.datatype}, and its values do not convert without loss"
        )
    return converted


# ------------------------------------------------------------------------------- encoding


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request: InferenceRequest,
    outputs: dict[str, np.ndarray],
) -> tuple[bytes, dict[str, str]]:
    """Encode the response body and its headers (content type, binary header length).

    Outputs go out in the order the request asked for them (the engine's order when it
    asked for all). An output is binary when its ``binary_data`` says so, or by default
    when the request set ``binary_data_output``.
    """
    default_binary = request.binary_data_output
    if request.outputs is None:
        order = [(name, default_binary) for name in outputs]
    else:
        order = [
            (o.name, default_binary if o.binary_data is None else o.binary_data)
            for o in request.outputs
        ]
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in order:
        try:
            array = np.asarray(outputs[name])
        except KeyError:
            raise InvalidInput(f"the model did not produce the requested output '{name}'") from None
        datatype = v2_datatype(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = _output_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _output_json(array, name, datatype)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = entries
    header = orjson.dumps(doc, option=_ORJSON_NUMPY)
    if not chunks:
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    headers = {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}
    return b"".join([header, *chunks]), headers


def _output_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype != "BYTES":
        return np.ascontiguousarray(array).tobytes()
    parts: list[bytes] = []
    pack = struct.Struct("<I").pack
    for item in array.reshape(-1).tolist():
        encoded = _as_bytes(item)
        parts.append(pack(len(encoded)))
        parts.append(encoded)
    return b"".join(parts)


def _as_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    return str(item).encode("utf-8")


def _output_json(array: np.ndarray, name: str, datatype: str) -> Any:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        try:
            return [
                item.decode("utf-8") if isinstance(item, bytes) else str(item)
                for item in flat.tolist()
            ]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output '{name}' holds bytes that are not UTF-8 and cannot go in JSON; "
                "request it with binary_data: true"
            ) from None
    if flat.dtype not in _ORJSON_DTYPES:
        return flat.tolist()
    # orjson writes NaN/Inf as null; tritonclient reads NaN/Infinity literals, which only
    # Python's json writes. Small arrays: look for null in orjson's output (cheaper than
    # numpy calls); large ones: one isfinite pass, then orjson serializes inside the body.
    if flat.size <= 1024:
        encoded = orjson.dumps(np.ascontiguousarray(flat), option=_ORJSON_NUMPY)
        if flat.dtype.kind == "f" and b"null" in encoded:
            encoded = json.dumps(flat.tolist()).encode()
        return orjson.Fragment(encoded)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return orjson.Fragment(json.dumps(flat.tolist()).encode())
    return np.ascontiguousarray(flat)
