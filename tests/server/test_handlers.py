"""Requests that are not protobuf at all, and answers racing the end of their call: statuses as
Triton gives them, and no ERROR line or traceback in the server's log for either."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from server import handlers
from server.logs import Throttled
from tests.server.fakes import FakeEngine
from tests.server.harness import RunningServer, fake_repository, running_server

RPC_TIMEOUT_S = 20.0
GARBAGE = b"\xff\xff\xff\xff"  # field 0 (reserved) and a varint that never ends: no message parses it
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def call_raw(channel: grpc.Channel, method: str, body: bytes, timeout_s: float = RPC_TIMEOUT_S) -> grpc.RpcError:
    """Send `body` as the request bytes of `method` (a stream of one message for the streaming
    RPCs) and return the error it was answered with."""
    try:
        if method in (STREAM_INFER, REFLECTION):
            list(channel.stream_stream(method)(iter([body]), timeout=timeout_s))
        else:
            channel.unary_unary(method)(body, timeout=timeout_s)
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"{method} accepted {body!r}")


def problems(records: list[logging.LogRecord]) -> list[str]:
    """Log records an operator would be paged for: WARNING and up, or any traceback."""
    return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in records if r.levelno >= logging.WARNING or r.exc_info]


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with running_server(fake_repository(FakeEngine(), max_batch_size=8)) as running:
        yield running


@pytest.mark.parametrize("method", [INFER, STREAM_INFER, HEALTH_CHECK, REFLECTION])
def test_an_unparseable_body_is_answered_as_triton_does_without_a_traceback(
        server: RunningServer, method: str, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.DEBUG), grpc.insecure_channel(server.url) as channel:
        error = call_raw(channel, method, GARBAGE)
        live = service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(service_pb2.ServerLiveRequest(),
                                                                            timeout=RPC_TIMEOUT_S)
    # the client's error, in grpc++'s words ("Unable to parse request"; grpc++ itself says INTERNAL)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("Unable to parse request: 4 bytes are not a valid ")
    assert live.live
    assert problems(caplog.records) == []


def test_a_body_that_parses_but_is_not_utf8_is_unparseable_too(server: RunningServer):
    body = service_pb2.ModelInferRequest(model_name="fake").SerializeToString().replace(b"fake", b"f\xffke")
    with grpc.insecure_channel(server.url) as channel:
        error = call_raw(channel, INFER, body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "inference.ModelInferRequest" in error.details()


def test_a_flood_of_garbage_logs_a_line_not_a_flood(server: RunningServer, caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(handlers, "_unparsed_log", Throttled(handlers.log))  # no earlier test's garbage counts
    with caplog.at_level(logging.INFO, logger="server"), grpc.insecure_channel(server.url) as channel:
        codes = {call_raw(channel, INFER, GARBAGE + bytes([i])).code() for i in range(40)}
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
    lines = [r for r in caplog.records if r.name == "server.handlers" and r.levelno >= logging.INFO]
    assert len(lines) == 1, [r.getMessage() for r in lines]


def test_requests_whose_deadline_races_their_answer_log_no_error(caplog: pytest.LogCaptureFixture):
    """A busy engine and many queued requests whose deadlines pass while they wait: each is
    answered DEADLINE_EXCEEDED, by the scheduler or by gRPC, whichever comes first; neither the
    loser of that race nor anything else may log an ERROR."""
    engine = FakeEngine(delay_s=0.3)
    ids = np.arange(4, dtype=np.int64).reshape(1, 4)
    request = service_pb2.ModelInferRequest(model_name="fake")
    for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
        request.inputs.add(name=name, datatype="INT64", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    with caplog.at_level(logging.DEBUG), running_server(fake_repository(engine, max_batch_size=1)) as running:
        with grpc.insecure_channel(running.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            codes = []
            for _ in range(8):  # unhandled, about 1 answer in 200 lost that race and logged a traceback
                calls = [stub.ModelInfer.future(request, timeout=0.02 + 0.001 * (i % 20)) for i in range(40)]
                codes += [call.exception().code() if call.exception() else grpc.StatusCode.OK for call in calls]
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes and set(codes) <= {grpc.StatusCode.OK,
                                                                       grpc.StatusCode.DEADLINE_EXCEEDED}
    assert problems(caplog.records) == []


class EndedCall:
    """A ServicerContext whose call gRPC core has already finished (as after a deadline)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise self.error


def test_abort_on_a_call_that_already_ended_is_logged_at_debug_only(caplog: pytest.LogCaptureFixture):
    context = EndedCall(grpc.aio.InternalError('Failed "execute_batch"'))
    with caplog.at_level(logging.DEBUG, logger="server.handlers"):
        asyncio.run(handlers.abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "too late"))  # type: ignore[arg-type]
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "already ended" in caplog.records[0].getMessage()


def test_abort_still_raises_what_context_abort_raises_when_the_answer_goes_out():
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(handlers.abort(EndedCall(grpc.aio.AbortError("Locally aborted.")),  # type: ignore[arg-type]
                                   grpc.StatusCode.NOT_FOUND, "no such model"))
