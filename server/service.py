"""`inference.GRPCInferenceService`: translates protobuf to tensors and back, nothing more.

Validation lives in `codec` (wire form) and `Model.check_inputs` (engine specs), a request
decoded for its model in `prepared`, text limits and the tokenizer threads in `text`, batching
in the model's `ModelScheduler`, status codes in `errors`, statistics in `stats`. Every unary
RPC goes through `server.rpc.rpc`, which turns a `ServerError` into its status code and
anything unexpected into INTERNAL, logged with the request's id.

The served models and their lifecycle (load, reload, unload, draining) belong to
`server.models.LoadedModels`; the repository RPCs only check that model control allows them and
call it. Triton's ModelConfig is built in `server.model_config`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping
from importlib import metadata

import grpc

from optimize.runtime.specs import TensorSpec
from server import codec
from server.errors import (
    FailedPrecondition,
    InvalidArgument,
    ServerError,
    Unavailable,
    status_code,
)
from server.model_config import model_config, wire_shape
from server.models import LoadedModels
from server.prepared import Prepared, Usage, answer_text, decode, failure_reason, token_count
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from server.rpc import Context, current_request_id, log_context, new_request_id, rpc, unimplemented
from server.scheduler import ModelScheduler
from server.stats import CANCELED, Timings
from server.text import TokenizerPool, check_tokens

log = logging.getLogger(__name__)

SERVER_NAME = "kiln"
# Protocol extensions this server implements (KServe v2 / Triton names). perf_analyzer calls
# ModelStatistics at every window edge when "statistics" is listed, and reports the server's
# queue and compute times from it.
EXTENSIONS = ("model_configuration", "model_repository", "schedule_policy", "statistics")
# Triton's model states in RepositoryIndex.
READY, UNAVAILABLE = "READY", "UNAVAILABLE"

try:
    VERSION = metadata.version("kiln")
except metadata.PackageNotFoundError:  # used from a source checkout without installing
    VERSION = "0+unknown"

# A text request is prepared again when its model is reloaded while it is tokenized; a reload
# takes far longer than tokenizing, so the second try finds the model settled unless something
# reloads it in a loop.
_PREPARE_ATTEMPTS = 3


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 service over the served `models`.

    `control_mode` "explicit" allows RepositoryModelLoad/Unload (`LoadedModels.load`/`unload`).
    """

    def __init__(self, models: LoadedModels, *, control_mode: str = "none") -> None:
        self.models = models
        self.control_mode = control_mode
        self.accepting = True  # False once shutdown begins: readiness goes false, infer → UNAVAILABLE
        self._tokenizer = TokenizerPool()

    @property
    def schedulers(self) -> Mapping[str, ModelScheduler]:
        """Each served model's scheduler, by name (read-only: `models` changes it)."""
        return self.models.schedulers

    # -- health -----------------------------------------------------------------------------
    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.accepting)

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            scheduler = self.models.served(request.name, request.version)
        except ServerError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.accepting and scheduler.accepting)

    # -- metadata ---------------------------------------------------------------------------
    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=VERSION, extensions=EXTENSIONS)

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        model = self.models.served(request.name, request.version).model
        tensor = pb.ModelMetadataResponse.TensorMetadata

        def tensors(specs: Mapping[str, TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [tensor(name=s.name, datatype=codec.datatype(s.dtype), shape=wire_shape(s)) for s in specs.values()]

        if model.advertises_text:  # one text per sample: [batch, 1], as Triton's string inputs
            assert model.text is not None
            inputs = [tensor(name=t.name, datatype="BYTES", shape=[-1, 1] if model.max_batch_size else [-1])
                      for t in model.text.inputs]
            outputs = [tensor(name=t.name, datatype=codec.datatype(t.dtype), shape=[-1, *t.shape])
                       for t in model.text.outputs]
        else:
            inputs, outputs = tensors(model.inputs), tensors(model.outputs)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(model.version)],
            platform=f"kiln_{model.engine.backend}",
            inputs=inputs,
            outputs=outputs,
        )

    @rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=model_config(self.models.served(request.name, request.version).model))

    # -- inference --------------------------------------------------------------------------
    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    async def infer(self, request: pb.ModelInferRequest, usage: Usage | None = None) -> pb.ModelInferResponse:
        """ModelInfer for the HTTP APIs (no deadline): the answer, or the `ServerError` the RPC
        would have turned into a status; `usage`, when given, is filled in."""
        return await self._infer(request, None, usage)

    async def _infer(self, request: pb.ModelInferRequest, deadline_in_s: float | None,
                     usage: Usage | None = None) -> pb.ModelInferResponse:
        """One inference: decode, validate, tokenize texts, queue, encode; counted in the model's
        statistics."""
        started = time.perf_counter_ns()
        deadline_s = time.monotonic() + deadline_in_s if deadline_in_s is not None else None
        if not self.accepting:
            raise Unavailable("the server is shutting down")
        scheduler = self.models.served(request.model_name, request.model_version)
        model = scheduler.model
        request_id = request.id or new_request_id()  # logs always carry an id
        current_request_id.set(request_id)
        timings = Timings()
        try:
            options = codec.request_options(request)
            scheduler, prepared = await self._prepare(request, scheduler, options, timings)
            model = scheduler.model
            if usage is not None and prepared.text:
                usage.prompt_tokens = token_count(prepared.inputs)
            outputs = await scheduler.infer(
                prepared.inputs, prepared.size, request_id, text=prepared.text, outputs=prepared.outputs,
                priority=options.priority,
                timeout_us=options.timeout_us, timings=timings,
                deadline_in_s=deadline_s - time.monotonic() if deadline_s is not None else None)
            if prepared.text:
                outputs = answer_text(model, outputs, prepared, timings)
            response = codec.encode_response(request, model, outputs, prepared.outputs)
        except asyncio.CancelledError:
            scheduler.stats.record_failure(time.perf_counter_ns() - started, CANCELED)
            log.debug("ModelInfer cancelled by the client", extra={"rpc": "ModelInfer", "model": model.name,
                                                                   "request_id": request_id})
            raise
        except ServerError as exc:
            scheduler.stats.record_failure(time.perf_counter_ns() - started, failure_reason(exc))
            raise
        scheduler.stats.record_success(time.perf_counter_ns() - started, timings)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("ModelInfer ok", extra={
                "rpc": "ModelInfer", "model": model.name, "request_id": request_id, "samples": prepared.size,
                "duration_ms": round((time.perf_counter_ns() - started) / 1e6, 3),
                "queue_ms": round(timings.queue_ns / 1e6, 3), "infer_ms": round(timings.compute_infer_ns / 1e6, 3),
            })
        return response

    async def _prepare(self, request: pb.ModelInferRequest, scheduler: ModelScheduler,
                       options: codec.RequestOptions, timings: Timings) -> tuple[ModelScheduler, Prepared]:
        """The request decoded and validated for `scheduler`'s model, its texts tokenized in the
        tokenizer pool (never on the event loop or a model instance), and the scheduler to queue
        it on. A reload that swaps the model in while texts are tokenized means the new
        version's pipeline and limits apply: the request is prepared again for it (up to
        `_PREPARE_ATTEMPTS` times, then `Unavailable`). Raises `InvalidArgument`, `NotFound`."""
        for _ in range(_PREPARE_ATTEMPTS):
            model = scheduler.model
            prepared = decode(request, model, options)
            if not prepared.text:
                return scheduler, prepared
            assert model.pipeline is not None
            texts = [prepared.inputs[name] for name in model.text_inputs]
            started = time.perf_counter_ns()
            encoded = await self._tokenizer.encode(model.pipeline, *texts)
            timings.compute_input_ns += time.perf_counter_ns() - started  # preparing inputs, as Triton counts it
            check_tokens(model.name, encoded, model.pipeline.max_length, options.truncate)
            served = self.models.served(request.model_name, request.model_version)
            if served is scheduler:
                return scheduler, dataclasses.replace(prepared, inputs=encoded.feeds, encoded=encoded)
            scheduler = served
        raise Unavailable(f"model '{scheduler.model.name}' was reloaded {_PREPARE_ATTEMPTS} times while the "
                          "request's texts were tokenized; try again")

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: Context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional stream: every request is queued as it arrives (so one stream's requests
        batch with each other and with everyone else's) and answered as soon as it is done, in
        completion order, matched by `id`. A failed request is answered with `error_message`;
        the stream goes on."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                response = await self._infer(request, context.time_remaining())
                if _wants_final_flag(request):
                    response.parameters["triton_final_response"].bool_param = True
                answer = pb.ModelStreamInferResponse(infer_response=response)
            except ServerError as exc:
                log.info("ModelStreamInfer request failed: %s", exc,
                         extra=log_context("ModelStreamInfer", request, status_code(exc)))
                answer = _stream_error(request, str(exc))
            except Exception as exc:
                log.exception("ModelStreamInfer request failed unexpectedly",
                              extra=log_context("ModelStreamInfer", request, grpc.StatusCode.INTERNAL))
                answer = _stream_error(request, f"internal error: {type(exc).__name__}: {exc}")
            await answers.put(answer)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:  # the client half-closed: finish what it sent
                    await asyncio.gather(*running, return_exceptions=True)
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # -- statistics -------------------------------------------------------------------------
    @rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: Context) -> pb.ModelStatisticsResponse:
        if request.name:
            schedulers = [self.models.served(request.name, request.version)]
        else:
            schedulers = [self.schedulers[name] for name in sorted(self.schedulers)]
        return pb.ModelStatisticsResponse(model_stats=[s.stats.proto() for s in schedulers])

    # -- repository -------------------------------------------------------------------------
    @rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: Context) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse()
        for state in self.models.states(ready_only=request.ready):
            if state.ready:
                index.models.add(name=state.name, version=str(state.version), state=READY)
            else:
                index.models.add(name=state.name, state=UNAVAILABLE, reason=state.reason)
        return index

    @rpc
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Context) -> pb.RepositoryModelLoadResponse:
        self._check_control("load")
        if request.parameters:
            names = ", ".join(sorted(request.parameters))
            raise InvalidArgument(f"RepositoryModelLoad parameters are not supported ({names}); edit the model's "
                                  "config.toml in the repository instead")
        await self.models.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Context) -> pb.RepositoryModelUnloadResponse:
        self._check_control("unload")
        await self.models.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _check_control(self, action: str) -> None:
        if self.control_mode != "explicit":
            raise FailedPrecondition(f"explicit model {action} is not allowed: the server runs with model control "
                                     f"mode '{self.control_mode}' (start it with --model-control-mode explicit)")
        if not self.accepting:
            raise Unavailable("the server is shutting down")

    async def stop_models(self, grace_s: float) -> None:
        """Drain every model's scheduler (shutdown), then stop the tokenizer threads."""
        await self.models.stop(grace_s)
        self._tokenizer.close()

    # -- not implemented --------------------------------------------------------------------
    SystemSharedMemoryStatus = unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = unimplemented("TraceSetting")
    LogSettings = unimplemented("LogSettings")


def _wants_final_flag(request: pb.ModelInferRequest) -> bool:
    parameter = request.parameters.get("triton_enable_empty_final_response")
    return parameter is not None and parameter.WhichOneof("parameter_choice") == "bool_param" and parameter.bool_param


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    if _wants_final_flag(request):
        response.parameters["triton_final_response"].bool_param = True
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response)
