"""KServe v2 REST, as Triton serves it over HTTP: JSON (and the binary tensor data extension,
which `tritonclient.http` uses by default) to the service's protobuf messages and back.

Every route calls the gRPC RPC of the same meaning, so answers and errors are the same; errors
come back as Triton's `{"error": "<message>"}` with Triton's HTTP codes. Health and readiness
answer with the status alone, 200 for true and 400 for false, as the KServe v2 protocol says.

Binary tensor data: when the header `Inference-Header-Content-Length: N` is present, the first N
bytes of the body are the JSON request and the rest holds the data of the inputs whose
parameters carry `binary_data_size`, in input order (raw little-endian, BYTES elements each
prefixed by a uint32 length: the same layout as gRPC's raw contents). Outputs asked for with
`"binary_data": true` (or all of them, with the request parameter `binary_data_output`) come
back the same way after the JSON response; the others as JSON `data`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server import codec
from server.errors import InvalidArgument, MalformedRequest
from server.http.common import KSERVE, call, endpoint, json_response, parse_json, read_body, until_disconnect
from server.proto import grpc_service_pb2 as pb
from server.service import InferenceService

HEADER_LENGTH = "inference-header-content-length"
_INT64 = (-(2**63), 2**63)


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.29; `label` is gone in 7
        return bool(field.is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def message_json(message: Message) -> dict[str, Any]:
    """`message` as Triton's HTTP API writes it: the .proto's field names, every scalar (also
    when it holds its default), 64-bit integers as JSON numbers (protobuf's own JSON mapping
    writes them as strings), enums by name, message fields only when set, one member of a
    oneof."""
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.containing_oneof is not None and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            result[field.name] = {str(k): _json_value(value_field, v) for k, v in value.items()}
        elif _repeated(field):
            result[field.name] = [_json_value(field, v) for v in value]
        elif entry is not None:
            if message.HasField(field.name):
                result[field.name] = message_json(value)
        else:
            result[field.name] = _json_value(field, value)
    return result


def _json_value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return message_json(value)
    if field.enum_type is not None:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


# -- requests ---------------------------------------------------------------------------------
def _object(document: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise MalformedRequest(f"{where}'{key}' must be a JSON object")
    return dict(value)


def _string(document: Mapping[str, Any], key: str, where: str) -> str:
    value = document.get(key)
    if not isinstance(value, str):
        raise MalformedRequest(f"{where}'{key}' must be a string")
    return value


def _shape(document: Mapping[str, Any], where: str) -> list[int]:
    shape = document.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and _INT64[0] <= d < _INT64[1] for d in shape):
        raise MalformedRequest(f"{where}'shape' must be a list of integers")
    return shape


def _set_parameters(target: Any, parameters: Mapping[str, Any], what: str) -> None:
    """Copy JSON `parameters` into a protobuf map of parameter messages (InferParameter,
    ModelRepositoryParameter), each value into the oneof member of its JSON type."""
    fields = target.GetEntryClass().DESCRIPTOR.fields_by_name["value"].message_type.fields_by_name
    for key, value in parameters.items():
        if isinstance(value, bool):
            member = "bool_param"
        elif isinstance(value, int):
            member = "int64_param" if _INT64[0] <= value < _INT64[1] else "uint64_param" if 0 <= value < 2**64 else ""
        elif isinstance(value, float):
            member = "double_param"
        elif isinstance(value, str):
            member = "string_param"
        else:
            member = ""
        if member not in fields:
            raise MalformedRequest(f"{what} '{key}' must be a boolean, a 64-bit integer, a number or a string, "
                                   f"got {json.dumps(value)[:80]}")
        setattr(target[key], member, value)


def _flatten(name: str, data: Any) -> list[Any]:
    """The elements of a tensor's JSON `data`, nested (row-major) or flat."""
    if not isinstance(data, list):
        raise MalformedRequest(f"input '{name}': 'data' must be a JSON array")
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _json_data(name: str, datatype: str, data: Any) -> bytes:
    """An input's JSON `data` as raw wire bytes (the layout of gRPC's raw contents), so the
    codec checks them against the shape exactly as it checks gRPC requests."""
    values = _flatten(name, data)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise MalformedRequest(f"input '{name}': BYTES data must be strings")
        try:
            elements = [v.encode() for v in values]
        except UnicodeEncodeError:
            raise MalformedRequest(f"input '{name}' holds a string that is not valid Unicode") from None
        array = np.empty(len(elements), dtype=object)
        array[:] = elements
        return codec.encode_tensor(array)
    if datatype not in codec.DTYPE_OF or datatype == "BF16":
        return b""  # the codec refuses the datatype, with the same words as for gRPC
    if datatype == "BOOL":
        fits = all(isinstance(v, bool) for v in values)
    elif datatype.startswith(("INT", "UINT")):
        fits = all(type(v) is int for v in values)
    else:
        fits = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not fits:
        kind = "true/false" if datatype == "BOOL" else "integers" if "INT" in datatype else "numbers"
        raise MalformedRequest(f"input '{name}': {datatype} data must be {kind}")
    try:
        return np.array(values, dtype=np.dtype(codec.DTYPE_OF[datatype]).newbyteorder("<")).tobytes()
    except OverflowError:
        raise InvalidArgument(f"input '{name}' holds values outside the range of {datatype}") from None


def infer_request(model: str, version: str, body: bytes,
                  header_length: str | None) -> tuple[pb.ModelInferRequest, dict[str, bool], bool]:
    """The ModelInferRequest a KServe v2 REST infer body carries, with which outputs to return
    as binary data (by name, and the default for the others). Raises `MalformedRequest` for a
    body that is not such a request, `InvalidArgument` for what this server does not support."""
    binary = memoryview(b"")
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise MalformedRequest(f"Inference-Header-Content-Length {header_length!r} is not a length within the "
                                   f"request body ({len(body)} bytes)")
        binary = memoryview(body)[int(header_length):]
        body = body[:int(header_length)]
    document = parse_json(body, "the inference request")
    if not isinstance(document, dict):
        raise MalformedRequest("the inference request must be a JSON object")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise MalformedRequest("'id' must be a string")
    request.id = request_id
    parameters = _object(document, "parameters", "")
    binary_default = parameters.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise MalformedRequest("request parameter 'binary_data_output' must be true or false")
    _set_parameters(request.parameters, parameters, "request parameter")
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise MalformedRequest("'inputs' must be a list of tensors")
    offset = 0
    for index, tensor in enumerate(inputs):
        where = f"inputs[{index}]."
        if not isinstance(tensor, dict):
            raise MalformedRequest(f"inputs[{index}] must be a JSON object")
        name, datatype = _string(tensor, "name", where), _string(tensor, "datatype", where)
        shape = _shape(tensor, where)
        tensor_parameters = _object(tensor, "parameters", where)
        if "shared_memory_region" in tensor_parameters:
            raise InvalidArgument(f"input '{name}': shared memory is not supported by this server; send the data "
                                  "in the request")
        size = tensor_parameters.pop("binary_data_size", None)
        if size is not None:
            if type(size) is not int or size < 0 or "data" in tensor:
                raise MalformedRequest(f"input '{name}': 'binary_data_size' must be a byte count, and the input "
                                       "then carries no 'data'")
            if offset + size > len(binary):
                raise MalformedRequest(f"input '{name}': binary_data_size {size} runs past the end of the request "
                                       f"body ({len(binary) - offset} bytes of binary data left)")
            raw = bytes(binary[offset:offset + size])
            offset += size
        elif "data" in tensor:
            raw = _json_data(name, datatype, tensor["data"])
        else:
            raise MalformedRequest(f"input '{name}' has neither 'data' nor the parameter 'binary_data_size'")
        entry = request.inputs.add(name=name, datatype=datatype, shape=shape)
        _set_parameters(entry.parameters, tensor_parameters, f"input '{name}' parameter")
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise MalformedRequest(f"the request body holds {len(binary) - offset} bytes of binary data that no input's "
                               "binary_data_size accounts for")
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise MalformedRequest("'outputs' must be a list")
    binary_of: dict[str, bool] = {}
    for index, output in enumerate(outputs):
        where = f"outputs[{index}]."
        if not isinstance(output, dict):
            raise MalformedRequest(f"outputs[{index}] must be a JSON object")
        name = _string(output, "name", where)
        output_parameters = _object(output, "parameters", where)
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in output_parameters:
                raise InvalidArgument(f"output '{name}': the parameter '{unsupported}' is not supported by this server")
        wants_binary = output_parameters.get("binary_data", binary_default)
        if not isinstance(wants_binary, bool):
            raise MalformedRequest(f"output '{name}': 'binary_data' must be true or false")
        binary_of[name] = wants_binary
        request.outputs.add(name=name)
    return request, binary_of, binary_default


# -- responses --------------------------------------------------------------------------------
def _json_values(datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            values.append(raw[offset + 4:offset + 4 + length].decode("utf-8", errors="replace"))
            offset += 4 + length
        return values
    return np.frombuffer(raw, dtype=np.dtype(codec.DTYPE_OF[datatype]).newbyteorder("<")).tolist()


def infer_response(response: pb.ModelInferResponse, binary_of: Mapping[str, bool], binary_default: bool) -> Response:
    """The KServe v2 REST response for `response`: outputs as JSON data, or as binary data after
    the JSON (with `Inference-Header-Content-Length`) where asked for."""
    outputs, chunks = [], []
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if binary_of.get(output.name, binary_default):
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_values(output.datatype, raw)
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    document["outputs"] = outputs
    if not chunks:
        return json_response(document)
    header = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(b"".join([header, *chunks]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


# -- routes -----------------------------------------------------------------------------------
class KServeRoutes:
    """The route handlers over one service; request bodies up to `limit_bytes`."""

    def __init__(self, service: InferenceService, limit_bytes: int) -> None:
        self.service = service
        self.limit_bytes = limit_bytes

    async def _call(self, rpc: str, request: Message) -> Any:
        return await call(self.service, rpc, request)

    @staticmethod
    def _model(request: Request) -> tuple[str, str]:
        return request.path_params["model"], request.path_params.get("version", "")

    async def _json_body(self, request: Request) -> dict[str, Any]:
        body = await read_body(request, self.limit_bytes)
        document = parse_json(body) if body.strip() else {}
        if not isinstance(document, dict):
            raise MalformedRequest("the request body must be a JSON object")
        return document

    async def live(self, request: Request) -> Response:
        answer = await self._call("ServerLive", pb.ServerLiveRequest())
        return Response(status_code=200 if answer.live else 400)

    async def ready(self, request: Request) -> Response:
        answer = await self._call("ServerReady", pb.ServerReadyRequest())
        return Response(status_code=200 if answer.ready else 400)

    async def server_metadata(self, request: Request) -> Response:
        return json_response(message_json(await self._call("ServerMetadata", pb.ServerMetadataRequest())))

    async def model_metadata(self, request: Request) -> Response:
        name, version = self._model(request)
        answer = await self._call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version))
        return json_response(message_json(answer))

    async def model_ready(self, request: Request) -> Response:
        name, version = self._model(request)
        answer = await self._call("ModelReady", pb.ModelReadyRequest(name=name, version=version))
        return Response(status_code=200 if answer.ready else 400)

    async def model_config(self, request: Request) -> Response:
        name, version = self._model(request)
        answer = await self._call("ModelConfig", pb.ModelConfigRequest(name=name, version=version))
        return json_response(message_json(answer.config))  # Triton answers the config itself

    async def statistics(self, request: Request) -> Response:
        name, version = request.path_params.get("model", ""), request.path_params.get("version", "")
        answer = await self._call("ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version))
        return json_response(message_json(answer))

    async def infer(self, request: Request) -> Response:
        name, version = self._model(request)
        body = await read_body(request, self.limit_bytes)
        message, binary_of, binary_default = infer_request(name, version, body, request.headers.get(HEADER_LENGTH))
        answer = await until_disconnect(request, self._call("ModelInfer", message))
        return infer_response(answer, binary_of, binary_default)

    async def repository_index(self, request: Request) -> Response:
        document = await self._json_body(request)
        ready = document.get("ready", False)
        if not isinstance(ready, bool):
            raise MalformedRequest("'ready' must be true or false")
        answer = await self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready))
        return json_response(message_json(answer)["models"])  # Triton answers the list itself

    async def load(self, request: Request) -> Response:
        return await self._model_control(request, "load", pb.RepositoryModelLoadRequest, "RepositoryModelLoad")

    async def unload(self, request: Request) -> Response:
        return await self._model_control(request, "unload", pb.RepositoryModelUnloadRequest, "RepositoryModelUnload")

    async def _model_control(self, request: Request, action: str, message_type: Any, rpc: str) -> Response:
        """A repository load or unload: the model from the path, `parameters` from the body."""
        document = await self._json_body(request)
        message = message_type(model_name=request.path_params["model"])
        _set_parameters(message.parameters, _object(document, "parameters", ""), f"{action} parameter")
        await self._call(rpc, message)
        return Response(status_code=200)


def routes(service: InferenceService, limit_bytes: int) -> list[Route]:
    """Triton's HTTP routes for what kiln implements over gRPC, each model route also under
    `/versions/{version}`. `/v2/models/stats` comes before `/v2/models/{model}` (as in Triton,
    a model named "stats" has its metadata hidden behind the statistics)."""
    handlers = KServeRoutes(service, limit_bytes)
    table: list[tuple[str, str, Any, str]] = [
        ("/v2/health/live", "GET", handlers.live, "ServerLive"),
        ("/v2/health/ready", "GET", handlers.ready, "ServerReady"),
        ("/v2", "GET", handlers.server_metadata, "ServerMetadata"),
        ("/v2/models/stats", "GET", handlers.statistics, "ModelStatistics"),
        ("/v2/repository/index", "POST", handlers.repository_index, "RepositoryIndex"),
        ("/v2/repository/models/{model}/load", "POST", handlers.load, "RepositoryModelLoad"),
        ("/v2/repository/models/{model}/unload", "POST", handlers.unload, "RepositoryModelUnload"),
    ]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        table += [
            (prefix, "GET", handlers.model_metadata, "ModelMetadata"),
            (f"{prefix}/ready", "GET", handlers.model_ready, "ModelReady"),
            (f"{prefix}/config", "GET", handlers.model_config, "ModelConfig"),
            (f"{prefix}/stats", "GET", handlers.statistics, "ModelStatistics"),
            (f"{prefix}/infer", "POST", handlers.infer, "ModelInfer"),
        ]
    return [Route(path, endpoint(KSERVE, f"HTTP {rpc}", handler), methods=[method])
            for path, method, handler, rpc in table]
