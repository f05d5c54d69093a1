"""One exception root for the server, and the one place that maps errors to gRPC status codes
and HTTP status codes.

Raise the subclass that says what went wrong; the gRPC service turns it into a status with
`status_code(exc)` and the HTTP front end into a response with `http_status(exc)`, the
exception's message as details. Messages are one line and name the thing at fault (the model,
the input, the config field).
"""

from __future__ import annotations

import grpc


class ServerError(Exception):
    """Base of every error the server raises on purpose."""


class ConfigError(ServerError, ValueError):
    """A server option or a model's config.toml holds a value outside what is allowed."""


class InvalidArgument(ServerError):
    """The request is malformed or does not match the model's inputs."""


class MalformedRequest(InvalidArgument):
    """An HTTP request body the front end cannot read as its route's request: not JSON, or not
    the route's schema (a missing, unknown or mistyped field). Requests that parse but break the
    model's rules are plain `InvalidArgument`s, as over gRPC."""


class TextTooLong(InvalidArgument):
    """A text holds more tokens than the model reads, and the request did not ask to truncate
    it. INVALID_ARGUMENT over gRPC (a property of the request, as Triton's shape errors); 413
    over HTTP, as text-embeddings-inference answers it."""


class PayloadTooLarge(ServerError):
    """A request is larger than the server accepts (`max_message_bytes`)."""


class NotFound(ServerError):
    """The request names a model (or version) the server does not serve."""


class Unavailable(ServerError):
    """The server cannot take or finish the request now (shutting down, model not ready, queue
    full, queue timeout)."""


class Rejected(Unavailable):
    """The model's queue policy turned the request away: its queue is full, or the request
    waited longer than its timeout (Triton answers both UNAVAILABLE)."""


class DeadlineExceeded(ServerError):
    """The request's deadline passed before it could run."""


class FailedPrecondition(ServerError):
    """The request is well-formed but not allowed in the server's current mode or state."""


class Unauthenticated(ServerError):
    """The RPC carries no valid credentials."""


class Internal(ServerError):
    """The engine failed while running an accepted request."""


class Unparseable(ServerError):
    """The request's bytes are not a protobuf message of the RPC's request type. Raised by the
    request parser (`server.handlers`) before any servicer code runs."""

    def __init__(self, message_type: str, size: int) -> None:
        # Triton's clients see grpc++'s words; the rest says which message and how big.
        super().__init__(f"Unable to parse request: {size} bytes are not a valid {message_type} message")


class ModelLoadFailed(InvalidArgument):
    """RepositoryModelLoad found the model but could not load it (bad config.toml, no version
    directory, an engine that does not load, whatever the loader raised)."""


class Unimplemented(ServerError):
    """The RPC exists in the protocol but this server does not implement it."""


# Triton answers these conditions with the same codes (its server's src/grpc/infer_handler.cc).
_STATUS: dict[type[ServerError], grpc.StatusCode] = {
    # A request body that is not a protobuf message is the client's error: INVALID_ARGUMENT, so
    # clients and retry policies do not take it for a server fault. (Triton never sees such a
    # body: grpc++ cancels the call with INTERNAL "Unable to parse request" before Triton's code
    # runs — include/grpcpp/server_interface.h, PayloadAsyncRequest::FinalizeResult. We keep
    # its words, not its status.)
    Unparseable: grpc.StatusCode.INVALID_ARGUMENT,
    # A failed RepositoryModelLoad is INVALID_ARG in Triton, whatever the cause: "load failed for
    # model 'x': <reason>" (triton-inference-server/core,
    # src/model_repository_manager/model_repository_manager.cc, LoadUnloadModels).
    ModelLoadFailed: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Internal: grpc.StatusCode.INTERNAL,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for `exc`: its class's entry (or its nearest base's), else INTERNAL."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL


# Triton's HTTP codes (its server's src/http_server.cc, HttpCodeFromError) for what it shares
# with gRPC; kiln's own for what only HTTP has: 422 for a body that is not the route's JSON
# (FastAPI's convention), 413 for one over the size limit. Deadlines exist over gRPC only.
_HTTP_STATUS: dict[type[ServerError], int] = {
    ConfigError: 400,
    InvalidArgument: 400,
    MalformedRequest: 422,
    TextTooLong: 413,
    PayloadTooLarge: 413,
    NotFound: 404,
    Unavailable: 503,
    DeadlineExceeded: 504,
    FailedPrecondition: 400,
    Unauthenticated: 401,
    Internal: 500,
    Unimplemented: 501,
}


def http_status(exc: BaseException, *, openai: bool = False) -> int:
    """The HTTP status code for `exc`: its class's entry (or its nearest base's), else 500.

    `openai`: for OpenAI's API, a request the queue policy turned away (`Rejected`: queue full,
    queue timeout) is 429, which OpenAI's clients back off from and retry; KServe v2 answers
    503 there, as Triton does."""
    if openai and isinstance(exc, Rejected):
        return 429
    for cls in type(exc).__mro__:
        if cls in _HTTP_STATUS:
            return _HTTP_STATUS[cls]
    return 500
