"""The gRPC plumbing of `server.service`: how every unary RPC answers errors (`rpc`: a
`ServerError` becomes its status code, anything unexpected INTERNAL, logged with its traceback),
the request id every log line about a request carries, and the RPCs of the protocol this server
does not implement."""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from server.errors import ServerError, status_code
from server.handlers import abort

log = logging.getLogger("server.service")  # the service's log: its RPCs fail here

Request = TypeVar("Request")
Response = TypeVar("Response")
Context = grpc.aio.ServicerContext
Handler = Callable[[Any, Request, Context], Awaitable[Response]]
# The id of the request being served (the client's, or one made up when it sent none), so every
# log line about it carries one.
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# Made-up ids: unique per process (pid) and request (counter), cheaper than uuid4's syscall.
_request_counter = itertools.count(1)


def new_request_id() -> str:
    return f"kiln-{os.getpid():x}-{next(_request_counter):x}"


def rpc(method: Handler) -> Handler:
    """Answer errors with a status: `ServerError` → its code and message; anything else →
    INTERNAL (logged with its traceback, since it is a bug)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> Any:
        try:
            return await method(self, request, context)
        except ServerError as exc:
            code, details = status_code(exc), str(exc)
            log.info("%s failed: %s", method.__name__, details, extra=log_context(method.__name__, request, code))
        except Exception as exc:
            code, details = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
            log.exception("%s failed unexpectedly", method.__name__, extra=log_context(method.__name__, request, code))
        await abort(context, code, details)  # the client's deadline or cancel may have ended the call first

    return wrapper


def log_context(rpc: str, request: Any, code: grpc.StatusCode) -> dict[str, str]:
    fields = {"rpc": rpc, "code": code.name}
    model = getattr(request, "model_name", "") or getattr(request, "name", "")
    if model:
        fields["model"] = model
    request_id = getattr(request, "id", "") or current_request_id.get()
    if request_id:
        fields["request_id"] = request_id
    return fields


def unimplemented(name: str) -> Callable[..., Awaitable[None]]:
    """An RPC of the protocol this server does not implement: UNIMPLEMENTED, with its name."""

    async def method(self: Any, request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by this server")

    method.__name__ = method.__qualname__ = name
    return method
