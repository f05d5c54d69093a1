"""`inference.GRPCInferenceService`: translates protobuf to tensors and back, nothing more.

Validation lives in `codec` (wire form) and `Model.check_inputs` (engine specs), batching in
the model's `ModelScheduler`, status codes in `errors`. Every RPC goes through `_rpc`, which
turns a `ServerError` into its status code and anything unexpected into INTERNAL, logged with
the request's id.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import metadata
from typing import Any, TypeVar

import grpc

from optimize.specs import Dim, TensorSpec
from server import codec
from server.errors import ServerError, Unavailable, status_code
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from server.proto import model_config_pb2 as mc
from server.repository import Repository
from server.scheduler import ModelScheduler

log = logging.getLogger(__name__)

SERVER_NAME = "kiln"
# Protocol extensions this server implements (KServe v2 names, as Triton lists them).
# perf_analyzer calls ModelStatistics only when "statistics" is listed, so it is added together
# with that RPC.
EXTENSIONS = ("model_configuration",)

try:
    VERSION = metadata.version("kiln")
except metadata.PackageNotFoundError:  # used from a source checkout without installing
    VERSION = "0+unknown"

Request = TypeVar("Request")
Response = TypeVar("Response")
Context = grpc.aio.ServicerContext
Handler = Callable[[Any, Request, Context], Awaitable[Response]]


def _rpc(method: Handler) -> Handler:
    """Answer errors with a status: `ServerError` → its code and message; anything else →
    INTERNAL (logged with its traceback, since it is a bug)."""

    @functools.wraps(method)
    async def wrapper(self: InferenceService, request: Any, context: Context) -> Any:
        try:
            return await method(self, request, context)
        except ServerError as exc:
            code, details = status_code(exc), str(exc)
            log.info("%s failed: %s", method.__name__, details, extra=_context(method.__name__, request, code))
        except Exception as exc:
            code, details = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
            log.exception("%s failed unexpectedly", method.__name__, extra=_context(method.__name__, request, code))
        await context.abort(code, details)

    return wrapper


def _context(rpc: str, request: Any, code: grpc.StatusCode) -> dict[str, str]:
    fields = {"rpc": rpc, "code": code.name}
    model = getattr(request, "model_name", "") or getattr(request, "name", "")
    if model:
        fields["model"] = model
    if getattr(request, "id", ""):
        fields["request_id"] = request.id
    return fields


def _unimplemented(name: str) -> Callable[..., Awaitable[None]]:
    """An RPC of the protocol this server does not implement: UNIMPLEMENTED, with its name."""

    async def method(self: InferenceService, request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by this server")

    method.__name__ = method.__qualname__ = name
    return method


def _wire_shape(spec: TensorSpec) -> list[int]:
    """Triton's shape convention: -1 for every dynamic dim. Metadata shapes include the batch
    dim (as -1); config dims leave it out when the model batches."""
    return [-1 if isinstance(d, Dim) else d for d in spec.shape]


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 service over a repository's models, each with its scheduler."""

    def __init__(self, repository: Repository, schedulers: Mapping[str, ModelScheduler]) -> None:
        self.repository = repository
        self.schedulers = dict(schedulers)
        self.accepting = True  # False once shutdown begins: readiness goes false, infer → UNAVAILABLE

    # -- health -----------------------------------------------------------------------------
    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.accepting)

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            model = self.repository.get(request.name, request.version)
        except ServerError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.accepting and self.schedulers[model.name].accepting)

    # -- metadata ---------------------------------------------------------------------------
    @_rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=VERSION, extensions=EXTENSIONS)

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        model = self.repository.get(request.name, request.version)

        def tensors(specs: Mapping[str, TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(
                    name=s.name, datatype=codec.datatype(s.dtype), shape=_wire_shape(s)
                )
                for s in specs.values()
            ]

        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(model.version)],
            platform=f"kiln_{model.engine.backend}",
            inputs=tensors(model.inputs),
            outputs=tensors(model.outputs),
        )

    @_rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        model = self.repository.get(request.name, request.version)
        batching = model.max_batch_size > 0

        def dims(spec: TensorSpec) -> list[int]:
            shape = _wire_shape(spec)
            return shape[1:] if batching and spec.batched else shape

        config = mc.ModelConfig(
            name=model.name,
            platform=f"kiln_{model.engine.backend}",
            backend=model.engine.backend,
            version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
            max_batch_size=model.max_batch_size,
            input=[
                mc.ModelInput(name=s.name, data_type=codec.config_datatype(s.dtype), dims=dims(s))
                for s in model.inputs.values()
            ],
            output=[
                mc.ModelOutput(name=s.name, data_type=codec.config_datatype(s.dtype), dims=dims(s))
                for s in model.outputs.values()
            ],
            # The Engine API does not say which device an engine runs on, hence KIND_AUTO.
            instance_group=[
                mc.ModelInstanceGroup(
                    name=model.name, kind=mc.ModelInstanceGroup.KIND_AUTO, count=model.config.instances
                )
            ],
        )
        if batching:
            config.dynamic_batching.max_queue_delay_microseconds = model.config.max_queue_delay_us
        return pb.ModelConfigResponse(config=config)

    # -- inference --------------------------------------------------------------------------
    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        started = time.perf_counter()
        if not self.accepting:
            raise Unavailable("the server is shutting down")
        model = self.repository.get(request.model_name, request.model_version)
        # Request parameters (Triton's `triton_enable_empty_final_response`, `priority`,
        # `timeout`, or any other) are accepted and, for now, not acted on.
        inputs = codec.decode_inputs(request, model)
        size = model.check_inputs(inputs)
        names = codec.requested_outputs(request, model)
        outputs = await self.schedulers[model.name].infer(inputs, size, request.id)
        response = codec.encode_response(request, model, outputs, names)
        if log.isEnabledFor(logging.DEBUG):
            duration_ms = round((time.perf_counter() - started) * 1e3, 3)
            log.debug("ModelInfer ok", extra={"rpc": "ModelInfer", "model": model.name, "request_id": request.id,
                                              "samples": size, "duration_ms": duration_ms})
        return response

    # -- not implemented (yet) --------------------------------------------------------------
    ModelStreamInfer = _unimplemented("ModelStreamInfer")
    ModelStatistics = _unimplemented("ModelStatistics")
    RepositoryIndex = _unimplemented("RepositoryIndex")
    RepositoryModelLoad = _unimplemented("RepositoryModelLoad")
    RepositoryModelUnload = _unimplemented("RepositoryModelUnload")
    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = _unimplemented("TraceSetting")
    LogSettings = _unimplemented("LogSettings")
