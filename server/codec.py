"""Protobuf ↔ numpy: the only place that knows how KServe v2 lays tensors out in messages.

Inputs arrive either as `raw_input_contents` (little-endian bytes, one entry per input, BYTES
elements each prefixed by a uint32 length) or as typed `contents` fields; outputs always leave
as `raw_output_contents`, which is what Triton does and what tritonclient and perf_analyzer
read. Every mismatch between what a request says and what it carries is an `InvalidArgument`
naming the input; nothing here trusts a shape before checking it against the data.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.errors import InvalidArgument
from server.proto import grpc_service_pb2 as pb
from server.repository import TEXT_INPUT, Model
from server.text import TextLimits

# KServe v2 datatype → numpy dtype name (optimize.runtime.specs' canonical names). BYTES is a numpy
# object array of `bytes`; BF16 has no numpy dtype.
DTYPE_OF: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
    "BYTES": "object",
}
DATATYPE_OF: dict[str, str] = {dtype: datatype for datatype, dtype in DTYPE_OF.items()}

# The typed field of InferTensorContents that carries each datatype (narrow ints travel widened).
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


_MAX_ELEMENTS = 2**40
_DATATYPE_CACHE: dict[object, str] = {}


def datatype(dtype: str | np.dtype) -> str:
    """The KServe v2 datatype of a numpy dtype or canonical dtype name ("int64" → "INT64")."""
    found = _DATATYPE_CACHE.get(dtype)
    if found is not None:
        return found
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DATATYPE_OF:
        raise ValueError(f"dtype {name} has no KServe v2 datatype")
    _DATATYPE_CACHE[dtype] = DATATYPE_OF[name]  # dtypes and names are few: looked up per tensor
    return DATATYPE_OF[name]


def config_datatype(dtype: str) -> str:
    """The ModelConfig `DataType` enum name of a canonical dtype name ("int64" → "TYPE_INT64")."""
    kserve = datatype(dtype)
    return "TYPE_STRING" if kserve == "BYTES" else f"TYPE_{kserve}"


def _shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def decode_tensor(name: str, kserve_type: str, shape: tuple[int, ...], raw: bytes | None,
                  contents: pb.InferTensorContents | None) -> np.ndarray:
    """One input tensor from its wire form: `raw` bytes when the request uses
    raw_input_contents, else the typed `contents`. Raises `InvalidArgument` when the data does
    not match the datatype and shape."""
    if kserve_type not in DTYPE_OF:
        raise InvalidArgument(
            f"input '{name}' has unknown datatype '{kserve_type}'; expected one of {', '.join(DTYPE_OF)}"
        )
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{name}' has a negative dimension in shape {_shape_str(shape)}")
    # numpy cannot even describe an empty array whose other dims multiply past its index range
    # ([0, 2**31, 2**31]); no message can carry that many elements anyway.
    if math.prod(d for d in shape if d) > _MAX_ELEMENTS:
        raise InvalidArgument(f"input '{name}' has shape {_shape_str(shape)}, too large for any message")
    count = math.prod(shape)
    if kserve_type == "BF16":
        raise InvalidArgument(f"input '{name}': datatype BF16 is not supported by this server")
    if kserve_type == "BYTES":
        return _decode_bytes(name, shape, count, raw, contents)
    dtype = np.dtype(DTYPE_OF[kserve_type]).newbyteorder("<")
    if raw is not None:
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise InvalidArgument(
                f"input '{name}' has {len(raw)} bytes of raw data, expected {expected} "
                f"for shape {_shape_str(shape)} and datatype {kserve_type}"
            )
        # A copy: the message's bytes are immutable and engines may write to their inputs.
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)
    field = _CONTENTS_FIELD.get(kserve_type)
    values = getattr(contents, field) if contents is not None and field else ()
    if field is None and count:
        raise InvalidArgument(f"input '{name}': datatype {kserve_type} must be sent in raw_input_contents")
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}' has {len(values)} values in contents.{field}, "
            f"expected {count} for shape {_shape_str(shape)}"
        )
    try:
        return np.asarray(list(values), dtype=dtype.newbyteorder("=")).reshape(shape)
    except (OverflowError, ValueError):  # e.g. 300 in uint_contents for a UINT8 input
        raise InvalidArgument(f"input '{name}' holds values outside the range of {kserve_type}") from None


def _decode_bytes(name: str, shape: tuple[int, ...], count: int, raw: bytes | None,
                  contents: pb.InferTensorContents | None) -> np.ndarray:
    if raw is None:
        elements = list(contents.bytes_contents) if contents is not None else []
    else:
        elements, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise InvalidArgument(f"input '{name}': raw BYTES data ends inside an element's length prefix")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise InvalidArgument(f"input '{name}': raw BYTES element {len(elements)} is longer than the data left")
            elements.append(raw[offset:offset + length])
            offset += length
    if len(elements) != count:
        raise InvalidArgument(
            f"input '{name}' has {len(elements)} BYTES elements, expected {count} for shape {_shape_str(shape)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array.reshape(shape)


def decode_inputs(request: pb.ModelInferRequest, model: Model, truncate: bool = False) -> dict[str, np.ndarray]:
    """The request's inputs as numpy arrays, checked for names, datatypes and data sizes
    against `model` (shapes and value ranges are the model's `check_inputs`' job).

    For a model that takes text, a request may instead carry only its BYTES inputs
    `model.text_inputs` (`text`, and `text_pair` for sentence pairs); each decodes to an object
    array of str, one per sample, within the model's `text_limits` (texts over the per-text
    limit cut to it when `truncate`). A request carries its data either in raw_input_contents
    or in typed contents, never both (Triton refuses the mix rather than pick one). Raises
    `InvalidArgument`."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"request has {len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "give raw contents for every input or for none"
        )
    texts = model.text_inputs
    alternative = " and ".join(f"'{t}'" for t in texts)
    expected = ", ".join(model.inputs) + (f" (or {alternative} alone)" if texts else "")
    arrays: dict[str, np.ndarray] = {}
    counted = 0  # bytes of the request's texts so far: its limit covers both texts of a pair
    for index, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidArgument(f"input '{tensor.name}' is given twice")
        if raw and tensor.HasField("contents"):  # Triton's words (src/grpc/infer_handler.cc)
            raise InvalidArgument(f"contents field must not be specified when using raw_input_contents for "
                                  f"'{tensor.name}' for model '{model.name}'")
        if tensor.name in texts:
            assert model.text_limits is not None
            arrays[tensor.name], size = _decode_text(tensor, raw[index] if raw else None, model.text_limits,
                                                     truncate, counted)
            counted += size
            continue
        spec = model.inputs.get(tensor.name)
        if spec is None:
            if model.text_refusal is not None and tensor.name == TEXT_INPUT:
                raise InvalidArgument(f"model '{model.name}' takes no text: {model.text_refusal}")
            raise InvalidArgument(f"unknown input '{tensor.name}' for model '{model.name}'; expected {expected}")
        want = datatype(spec.dtype)
        if tensor.datatype != want:
            raise InvalidArgument(f"input '{tensor.name}' has datatype {tensor.datatype or '(none)'}, expected {want}")
        arrays[tensor.name] = decode_tensor(
            tensor.name, tensor.datatype, tuple(tensor.shape),
            raw[index] if raw else None,
            tensor.contents if tensor.HasField("contents") else None,
        )
    sent = [name for name in texts if name in arrays]
    if sent:
        others = ", ".join(repr(n) for n in arrays if n not in texts)
        if others:
            raise InvalidArgument(f"input '{sent[0]}' cannot be combined with {others}: send texts or tokens, not both")
        missing = [name for name in texts if name not in arrays]
        if missing:
            raise InvalidArgument(f"model '{model.name}' is a {model.task} engine: it takes pairs of texts, as the "
                                  f"inputs {alternative} (one of each per pair); input '{missing[0]}' is missing")
        return arrays
    missing = [name for name in model.inputs if name not in arrays]
    if missing:
        names = ", ".join(repr(m) for m in missing)
        raise InvalidArgument(f"missing input(s) {names} for model '{model.name}'; expected {expected}")
    return arrays


def _decode_text(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, limits: TextLimits,
                 truncate: bool, counted: int = 0) -> tuple[np.ndarray, int]:
    """A text input: BYTES of shape [n] or [n, 1], UTF-8, within `limits` (checked on the bytes,
    before anything decodes a text too long to keep; `counted` bytes of the request's other
    text inputs count towards its limit); an object array of n str, and their bytes."""
    name = tensor.name
    if tensor.datatype != "BYTES":
        raise InvalidArgument(f"input '{name}' has datatype {tensor.datatype or '(none)'}, expected BYTES")
    shape = tuple(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InvalidArgument(
            f"input '{name}' has shape {_shape_str(shape)}, expected [n] or [n, 1] (one text per row)")
    elements = decode_tensor(name, "BYTES", shape, raw, tensor.contents if tensor.HasField("contents") else None)
    bounded = limits.apply(name, list(elements.reshape(-1)), truncate, counted)
    texts = np.empty(len(bounded), dtype=object)
    for i, element in enumerate(bounded):
        try:
            texts[i] = element.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"input '{name}' element {i} is not valid UTF-8 text") from None
    return texts, sum(len(b) for b in bounded)


_INT_PARAMETER = ("int64_param", "uint64_param")


@dataclass(frozen=True)
class RequestOptions:
    """What a request's parameters ask for: `priority` (0: the model's default level),
    `timeout_us` (0: none) and `truncate` (cut texts over the model's per-text byte limit
    instead of refusing them)."""

    priority: int = 0
    timeout_us: int = 0
    truncate: bool = False


def _int_parameter(request: pb.ModelInferRequest, name: str) -> int | None:
    if name not in request.parameters:
        return None
    parameter = request.parameters[name]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in _INT_PARAMETER:
        raise InvalidArgument(
            f"request parameter '{name}' must be an integer (int64_param or uint64_param), got {kind}")
    value = getattr(parameter, kind)
    if value < 0:
        raise InvalidArgument(f"request parameter '{name}' must be >= 0, got {value}")
    return int(value)


def _bool_parameter(request: pb.ModelInferRequest, name: str) -> bool:
    if name not in request.parameters:
        return False
    kind = request.parameters[name].WhichOneof("parameter_choice")
    if kind != "bool_param":
        raise InvalidArgument(f"request parameter '{name}' must be a boolean (bool_param), got {kind}")
    return bool(request.parameters[name].bool_param)


def request_options(request: pb.ModelInferRequest) -> RequestOptions:
    """The request's `priority` and `timeout` (µs) parameters, Triton's names, and `truncate`
    (a boolean, as Hugging Face TEI's). Other parameters are accepted and ignored, except
    sequence batching's, which kiln's models do not support. Raises `InvalidArgument`."""
    priority = _int_parameter(request, "priority") or 0
    timeout_us = _int_parameter(request, "timeout") or 0
    truncate = _bool_parameter(request, "truncate")
    for name in ("sequence_id", "sequence_start", "sequence_end"):
        if name in request.parameters:
            parameter = request.parameters[name]
            kind = parameter.WhichOneof("parameter_choice")
            if kind is not None and getattr(parameter, kind):
                raise InvalidArgument(f"request parameter '{name}': this model does not support sequence batching")
    return RequestOptions(priority, timeout_us, truncate)


def parameter_values(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The request's parameters as Python values (bool, int, float or str), by name."""
    values = {}
    for name, parameter in request.parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        if kind is not None:
            values[name] = getattr(parameter, kind)
    return values


def requested_outputs(request: pb.ModelInferRequest, model: Model, text: bool = False) -> list[str]:
    """Names of the outputs to return, in the request's order; when none is named, every
    output (or, for a `text` request, those of the model's text interface: `label` and `score`
    for a classifier, ...). A text request may also name the engine's own outputs. Raises
    `InvalidArgument` for an output the model does not have."""
    if not request.outputs:
        return list(model.text_outputs) if text and model.text_outputs else list(model.outputs)
    known = [*model.text_outputs, *(n for n in model.outputs if n not in model.text_outputs)] if text \
        else list(model.outputs)
    names: list[str] = []
    for output in request.outputs:
        if output.name not in known:
            raise InvalidArgument(
                f"unknown output '{output.name}' requested from model '{model.name}'; "
                f"{'a text request gets' if text else 'it has'} {', '.join(known)}"
            )
        if output.name not in names:
            names.append(output.name)
    return names


def encode_tensor(array: np.ndarray) -> bytes:
    """Raw wire bytes of an array: little-endian, row-major; BYTES elements length-prefixed."""
    if array.dtype == object:
        parts = []
        for element in array.reshape(-1):
            data = element if isinstance(element, bytes) else str(element).encode()
            parts += [struct.pack("<I", len(data)), data]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_response(request: pb.ModelInferRequest, model: Model, outputs: Mapping[str, np.ndarray],
                    names: list[str]) -> pb.ModelInferResponse:
    """The response carrying `outputs[name]` for each of `names` in raw_output_contents, with
    the request's id echoed."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
    for name in names:
        array = outputs[name]
        response.outputs.add(name=name, datatype=datatype(array.dtype), shape=array.shape)
        response.raw_output_contents.append(encode_tensor(array))
    return response
