"""The HTTP port as part of the server: `python -m server` serves it beside gRPC (an ephemeral
port named in the startup log) and drains both on SIGTERM; a port in use stops the start; the
bearer token and TLS apply to HTTP as to gRPC."""

from __future__ import annotations

import http.client
import re
import signal
import socket
import ssl
import threading
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.server.fakes import FakeTextEngine
from tests.server.harness import RunningServer, fake_repository, int64_inputs, make_repository
from tests.server.http.helpers import base_url, fetch, http_server, kserve_error, openai_error
from tests.server.test_cli import pending, sigterm_once_accepted, start, wait_for_port
from tests.server.test_security import certificate  # noqa: F401  (a fixture: a self-signed certificate)

TOKEN = "s3cret-token"


def test_one_process_serves_http_beside_grpc_and_drains_both_on_sigterm(tmp_path: Path, minilm_engine_dir: Path):
    # A long queue delay keeps requests that arrive together queued until the shutdown flushes them.
    repository = make_repository(tmp_path, minilm_engine_dir, max_batch_size=8, max_queue_delay_us=3_000_000)
    log = tmp_path / "server.log"
    process = start(["--repository", str(repository), "--port", "0", "--http-port", "0", "--metrics-port", "0",
                     "--shutdown-grace-s", "20"], log)
    try:
        grpc_port = wait_for_port(process, log)
        text = log.read_text()
        http_url = re.search(r"HTTP on (http://127\.0\.0\.1:(\d+)):", text).group(1)  # type: ignore[union-attr]
        metrics = re.search(r"metrics on (http://\S+)", text).group(1)  # type: ignore[union-attr]
        assert not http_url.endswith(f":{grpc_port}")
        answers: list[object] = []

        def over_openai(i: int) -> None:
            reply = fetch(f"{http_url}/v1/embeddings", {"model": "minilm", "input": f"sentence {i}"})
            answers.append(("openai", reply.status, len(reply.json()["data"][0]["embedding"])))

        def over_kserve() -> None:
            body = {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["another one"]}]}
            reply = fetch(f"{http_url}/v2/models/minilm/infer", body)
            answers.append(("kserve", reply.status, reply.json()["outputs"][0]["shape"]))

        def over_grpc() -> None:
            ids = np.full((1, 8), 1000, dtype=np.int64)
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            result = client.infer("minilm", int64_inputs({"input_ids": ids, "attention_mask": np.ones_like(ids)}),
                                  client_timeout=30)
            answers.append(("grpc", 200, list(result.as_numpy("sentence_embedding").shape)))

        threads = [threading.Thread(target=over_openai, args=(i,)) for i in range(2)]
        threads += [threading.Thread(target=over_kserve), threading.Thread(target=over_grpc)]
        for thread in threads:
            thread.start()
        # all four accepted over both ports, then SIGTERM
        sigterm_once_accepted(process, threads, lambda: len(answers) + pending(metrics), 4, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert sorted(answers, key=str) == sorted([("openai", 200, 384)] * 2 + [("kserve", 200, [1, 384]),
                                                                          ("grpc", 200, [1, 384])], key=str)
    text = log.read_text()
    assert re.search(r"shutting down: [0-4] request\(s\) queued", text) and "server stopped" in text


def test_an_http_port_in_use_stops_the_start_with_one_line(tmp_path: Path):
    (tmp_path / "repo").mkdir()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        log = tmp_path / "server.log"
        process = start(["--repository", str(tmp_path / "repo"), "--port", "0", "--http-port", str(port),
                         "--no-metrics"], log)
        assert process.wait(timeout=60) == 1
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith("python -m server: error:") and f"cannot serve HTTP on 127.0.0.1:{port}" in last
        # Without HTTP the same server starts: --no-http is off, --http-port 0 would pick a free port.
        quiet = tmp_path / "quiet.log"
        process = start(["--repository", str(tmp_path / "repo"), "--port", "0", "--http-port", str(port),
                         "--no-http", "--no-metrics"], quiet)
        try:
            wait_for_port(process, quiet)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        assert "HTTP on" not in quiet.read_text()


def test_answers_with_a_body_are_not_held_back_by_delayed_acks():
    """Headers and body leave in two writes; without TCP_NODELAY on the server's connections the
    body waits for the client's delayed ACK, and every answer takes 40 ms or more."""
    with http_server(fake_repository(FakeTextEngine(), max_batch_size=8)) as running:
        connection = http.client.HTTPConnection("127.0.0.1", running.server.http_port, timeout=30)
        durations = []
        for _ in range(15):  # one keep-alive connection, as clients pool them
            started = time.perf_counter()
            connection.request("GET", "/v2/models/fake")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
            durations.append(time.perf_counter() - started)
        connection.close()
    assert sorted(durations)[len(durations) // 2] < 0.02, durations


# -- bearer token ---------------------------------------------------------------------------------

@pytest.fixture
def token_server() -> Iterator[RunningServer]:
    with http_server(fake_repository(FakeTextEngine(), max_batch_size=8), auth_token=TOKEN) as running:
        yield running


@pytest.mark.parametrize("headers", [None, {"authorization": "Bearer wrong"}, {"authorization": TOKEN},
                                     {"x-api-key": TOKEN}])
def test_http_requests_without_the_right_token_are_401_in_their_apis_shape(token_server: RunningServer, headers):  # type: ignore[no-untyped-def]
    base = base_url(token_server)
    reply = fetch(f"{base}/v1/embeddings", {"model": "fake", "input": "a"}, headers=headers)
    assert openai_error(reply, 401)["type"] == "authentication_error"
    assert reply.headers["www-authenticate"] == "Bearer"
    for path in ("/v2", "/v2/models/fake", "/v2/models/fake/ready", "/v2/models/stats", "/v2/nope"):
        kserve_error(fetch(f"{base}{path}", headers=headers), 401)
    openai_error(fetch(f"{base}/v1/models", headers=headers), 401)
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}
    assert "needs the header 'Authorization: Bearer <token>'" in kserve_error(
        fetch(f"{base}/v2/models/fake/infer", body, headers=headers), 401)
    assert token_server.server.service.schedulers["fake"].stats.success.count == 0


def test_health_needs_no_token_and_clients_that_send_it_are_served(token_server: RunningServer):
    base = base_url(token_server)
    assert fetch(f"{base}/v2/health/live").status == 200 and fetch(f"{base}/v2/health/ready").status == 200
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0, timeout=30)
    assert sdk.embeddings.create(model="fake", input="a b c").usage.prompt_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    client = httpclient.InferenceServerClient(f"127.0.0.1:{token_server.server.http_port}")
    assert client.get_model_metadata("fake", headers={"Authorization": f"Bearer {TOKEN}"})["name"] == "fake"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("fake")
    assert info.value.status() == "401"


# -- TLS ------------------------------------------------------------------------------------------

def test_with_tls_http_is_https_only(certificate: tuple[Path, Path]):  # noqa: F811
    cert, key = certificate
    with http_server(fake_repository(FakeTextEngine(), max_batch_size=8), tls_cert_file=cert,
                     tls_key_file=key) as running:
        trusting = ssl.create_default_context(cafile=str(cert))
        reply = fetch(f"{base_url(running, 'https')}/v1/embeddings", {"model": "fake", "input": "a b"},
                      context=trusting)
        assert reply.status == 200 and reply.json()["usage"]["prompt_tokens"] == 2
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            fetch(f"{base_url(running)}/v2/health/live")
        with grpc.secure_channel(running.url, grpc.ssl_channel_credentials(cert.read_bytes())) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)  # gRPC speaks TLS on its own port too


def test_with_a_client_ca_https_wants_a_client_certificate(certificate: tuple[Path, Path]):  # noqa: F811
    cert, key = certificate
    with http_server(fake_repository(FakeTextEngine(), max_batch_size=8), tls_cert_file=cert, tls_key_file=key,
                     tls_client_ca_file=cert) as running:
        url = f"{base_url(running, 'https')}/v2/health/ready"
        anonymous = ssl.create_default_context(cafile=str(cert))
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            fetch(url, context=anonymous)
        known = ssl.create_default_context(cafile=str(cert))
        known.load_cert_chain(str(cert), str(key))
        assert fetch(url, context=known).status == 200
