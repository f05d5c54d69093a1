"""Registering gRPC services so that every request, even garbage, gets a status Triton would give,
and answering calls that may already have ended.

grpc.aio parses a request with its handler's `request_deserializer` before any servicer code
runs, and takes an exception there for a bug of the servicer: the client gets UNKNOWN and the
log an ERROR traceback, per request. `add_service` registers a service's methods with a parser
that never raises: bytes that are not a message of the method's request type become
`Unparsed`, which the method's handler answers with `Unparseable`'s status (INTERNAL "Unable to
parse request", what Triton's grpc++ answers, see `server.errors`) before the servicer is
called. A stream's unparseable message ends the stream with that status.

`abort` is `context.abort` for a call that may have ended meanwhile: a client deadline or
cancel racing the answer is expected, not an error worth a traceback.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from server.errors import Unparseable, status_code
from server.logs import Throttled

log = logging.getLogger(__name__)
# Anyone can send garbage (health checks need no token): a flood of it is a few lines.
_unparsed_log = Throttled(log)

Behaviour = Callable[..., Any]


class Unparsed:
    """What a method's parser returns for bytes that are not a message of its request type."""

    __slots__ = ("error",)

    def __init__(self, error: Unparseable) -> None:
        self.error = error


def parser(message: type[Message]) -> Callable[[bytes], Message | Unparsed]:
    """A request deserializer for `message` that returns `Unparsed` instead of raising."""
    from_string = message.FromString
    name = message.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Unparsed:
        try:
            return from_string(data)
        except DecodeError:
            return Unparsed(Unparseable(name, len(data)))

    return parse


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End the call with `code` and `details`: raises `grpc.aio.AbortError`, as `context.abort`
    does. When the call has already ended (its deadline passed or its client cancelled while
    the answer was being made), gRPC core refuses the status; that is logged at DEBUG and this
    returns, and grpc.aio finishes the call quietly."""
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError:
        raise
    except grpc.aio.InternalError as exc:  # cygrpc's ExecuteBatchError: the call is over
        log.debug("could not answer %s (%s): the call had already ended: %s", code.name, details, exc)


async def _refuse_unparsed(method: str, unparsed: Unparsed, context: grpc.aio.ServicerContext) -> None:
    code = status_code(unparsed.error)
    _unparsed_log.log("%s failed: %s", method, unparsed.error, extra={"rpc": method, "code": code.name})
    await abort(context, code, str(unparsed.error))


def _unary_request(method: str, behaviour: Behaviour) -> Behaviour:
    if inspect.isasyncgenfunction(behaviour):
        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Unparsed):
                await _refuse_unparsed(method, request, context)
                return
            async for response in behaviour(request, context):
                yield response

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Unparsed):
            return await _refuse_unparsed(method, request, context)
        return await behaviour(request, context)

    return coroutine


class _StreamUnparsed(Exception):
    """Carries an `Unparsed` message out of a request stream, through the servicer."""

    def __init__(self, unparsed: Unparsed) -> None:
        super().__init__(str(unparsed.error))
        self.unparsed = unparsed


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Unparsed):
            raise _StreamUnparsed(request)
        yield request


def _stream_request(method: str, behaviour: Behaviour) -> Behaviour:
    if inspect.isasyncgenfunction(behaviour):
        async def generator(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in behaviour(_checked(requests), context):
                    yield response
            except _StreamUnparsed as exc:
                await _refuse_unparsed(method, exc.unparsed, context)

        return generator

    async def coroutine(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(_checked(requests), context)
        except _StreamUnparsed as exc:
            return await _refuse_unparsed(method, exc.unparsed, context)

    return coroutine


_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handler(method: MethodDescriptor, behaviour: Behaviour) -> grpc.RpcMethodHandler:
    """The handler of one method: `behaviour` (an async servicer method: a coroutine function, or
    an async generator function for a method that streams responses) behind the tolerant parser."""
    parse = parser(GetMessageClass(method.input_type))
    serialize = GetMessageClass(method.output_type).SerializeToString
    wrap = _stream_request if method.client_streaming else _unary_request
    make = _MAKERS[method.client_streaming, method.server_streaming]
    return make(wrap(method.name, behaviour), request_deserializer=parse, response_serializer=serialize)


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Serve `servicer`'s methods of `service` on `server` (in place of the generated
    `add_<Service>Servicer_to_server`), each behind the tolerant parser."""
    handlers = {m.name: method_handler(m, getattr(servicer, m.name)) for m in service.methods}
    server.add_registered_method_handlers(service.full_name, handlers)
