"""Optional TLS and bearer-token auth on the gRPC port, with a throwaway self-signed
certificate made by the `openssl` command for each test session."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.server.harness import RunningServer, fake_repository, int64_inputs, running_server
from tests.server.fakes import FakeEngine

TOKEN = "s3cret-token"
RPC_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for localhost and 127.0.0.1, valid for a day."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def tokens() -> list[grpcclient.InferInput]:
    ids = np.arange(6, dtype=np.int64).reshape(1, 6)
    return int64_inputs({"input_ids": ids, "attention_mask": np.ones_like(ids)})


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[RunningServer]:
    cert, key = certificate
    with running_server(fake_repository(FakeEngine(), max_batch_size=8), tls_cert_file=cert, tls_key_file=key) as s:
        yield s


def test_a_tls_server_serves_clients_that_trust_its_certificate(tls_server: RunningServer,
                                                                certificate: tuple[Path, Path]):
    client = grpcclient.InferenceServerClient(tls_server.url, ssl=True, root_certificates=str(certificate[0]))
    assert client.infer("fake", tokens(), client_timeout=RPC_TIMEOUT_S).as_numpy("lengths").tolist() == [6]


def test_a_tls_server_refuses_plaintext_clients(tls_server: RunningServer):
    with grpc.insecure_channel(tls_server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def token_server() -> Iterator[RunningServer]:
    with running_server(fake_repository(FakeEngine(), max_batch_size=8), auth_token=TOKEN) as running:
        yield running


@pytest.mark.parametrize("headers", [None, {"authorization": "Bearer wrong"}, {"authorization": TOKEN},
                                     {"x-api-key": TOKEN}])
def test_calls_without_the_right_bearer_token_are_unauthenticated(token_server: RunningServer, headers):  # type: ignore[no-untyped-def]
    client = token_server.client()
    for call in (lambda: client.infer("fake", tokens(), headers=headers),
                 lambda: client.get_model_metadata("fake", headers=headers),
                 lambda: client.get_inference_statistics(headers=headers)):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"


def test_calls_with_the_bearer_token_are_served_and_health_checks_need_none(token_server: RunningServer):
    client = token_server.client()
    result = client.infer("fake", tokens(), headers={"authorization": f"Bearer {TOKEN}"})
    assert result.as_numpy("lengths").tolist() == [6]
    with grpc.insecure_channel(token_server.url) as channel:  # load balancers cannot send tokens
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_streams_need_the_token_too(token_server: RunningServer):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(token_server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ModelStreamInfer(iter([service_pb2.ModelInferRequest(model_name="fake")]), timeout=RPC_TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_token_is_checked_before_the_body_is_parsed(token_server: RunningServer, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch):
    from server import app
    from server.logs import Throttled

    monkeypatch.setattr(app, "_refusals", Throttled(app.log))  # no earlier test's refusals count
    garbage = b"\xff\xff\xff\xff"
    with caplog.at_level(logging.INFO), grpc.insecure_channel(token_server.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for _ in range(30):
            with pytest.raises(grpc.RpcError) as info:
                infer(garbage, timeout=RPC_TIMEOUT_S)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:  # with the token, the body is parsed (and refused)
            infer(garbage, timeout=RPC_TIMEOUT_S, metadata=[("authorization", f"Bearer {TOKEN}")])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("Unable to parse request")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    refusals = [r for r in caplog.records if "refused an unauthenticated call" in r.getMessage()]
    assert len(refusals) == 1  # 30 refusals, one line: unauthenticated clients cannot flood the log
