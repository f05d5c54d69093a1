"""Prometheus metrics over HTTP with Triton's names and meanings, and structured logs that
carry request ids."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from server.logs import JsonFormatter
from tests.server.harness import fake_repository, int64_inputs, running_server
from tests.server.fakes import FakeEngine

RPC_TIMEOUT_S = 20.0


def tokens(batch: int = 1, seq: int = 6) -> list[grpcclient.InferInput]:
    ids = np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) % 100
    return int64_inputs({"input_ids": ids, "attention_mask": np.ones_like(ids)})


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample: (name, sorted labels) → value."""
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT_S) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def test_metrics_use_tritons_names_and_count_what_triton_counts():
    engine = FakeEngine(delay_s=0.05)
    repository = fake_repository(engine, max_batch_size=8, max_queue_delay_us=20_000)
    with running_server(repository, metrics_port=0) as running:
        url = running.server.metrics.url
        client = running.client()
        threads = [threading.Thread(target=client.infer, args=("fake", tokens(batch=2)),
                                    kwargs={"client_timeout": RPC_TIMEOUT_S}) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(RPC_TIMEOUT_S)
        with pytest.raises(InferenceServerException):
            client.infer("fake", tokens(seq=17))
        samples = scrape(url)
    labels = (("model", "fake"), ("version", "1"))
    assert samples[("nv_inference_request_success", labels)] == 3
    assert samples[("nv_inference_request_failure", (*labels[:1], ("reason", "OTHER"), labels[1]))] == 1
    assert samples[("nv_inference_request_failure", (*labels[:1], ("reason", "REJECTED"), labels[1]))] == 0
    assert samples[("nv_inference_count", labels)] == 6  # samples, not requests
    assert samples[("nv_inference_exec_count", labels)] == len(engine.calls)
    assert samples[("nv_inference_pending_request_count", labels)] == 0
    assert samples[("nv_inference_compute_infer_duration_us", labels)] >= 3 * 45_000
    assert samples[("nv_inference_request_duration_us", labels)] >= samples[("nv_inference_queue_duration_us", labels)]
    for name in ("nv_inference_compute_input_duration_us", "nv_inference_compute_output_duration_us"):
        assert (name, labels) in samples
    # The batch-size histogram: one observation per execution, summing to the samples inferred.
    assert samples[("kiln_batch_size_count", labels)] == len(engine.calls)
    assert samples[("kiln_batch_size_sum", labels)] == 6
    assert samples[("kiln_batch_size_bucket", (("le", "+Inf"), *labels))] == len(engine.calls)
    assert samples[("kiln_batch_size_bucket", (("le", "1.0"), *labels))] == 0  # every batch held >= 2


def test_pending_request_count_shows_the_queue_while_the_engine_is_busy():
    engine = FakeEngine(delay_s=0.3)
    with running_server(fake_repository(engine, max_batch_size=1), metrics_port=0) as running:
        client = running.client()
        threads = [threading.Thread(target=client.infer, args=("fake", tokens()),
                                    kwargs={"client_timeout": RPC_TIMEOUT_S}) for _ in range(3)]
        for t in threads:
            t.start()
        batcher = running.server.service.schedulers["fake"].batcher
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while len(batcher) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        pending = scrape(running.server.metrics.url)[
            ("nv_inference_pending_request_count", (("model", "fake"), ("version", "1")))]
        for t in threads:
            t.join(RPC_TIMEOUT_S)
    assert pending == 2


def test_the_metrics_port_answers_404_for_every_path_but_metrics():
    """A readiness probe aimed at the metrics port by Triton habit must fail, not read 200."""
    with running_server(fake_repository(FakeEngine(), max_batch_size=8), metrics_port=0) as running:
        base = running.server.metrics.url.removesuffix("/metrics")
        for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/fake/ready", "/", "/metricsx", "/metrics/x",
                     "/favicon.ico", "/%0a%00"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(base + path, timeout=RPC_TIMEOUT_S)
            assert info.value.code == 404, path
            assert "nv_inference" not in info.value.read().decode()
        for path in ("/metrics", "/metrics/", "/metrics?debug=1"):  # Triton's /metrics/?, any query
            with urllib.request.urlopen(base + path, timeout=RPC_TIMEOUT_S) as ok:
                assert ok.status == 200 and "nv_inference_count" in ok.read().decode()


def test_request_logs_carry_the_request_id_as_a_field(caplog: pytest.LogCaptureFixture):
    with running_server(fake_repository(FakeEngine(), max_batch_size=8)) as running:
        with caplog.at_level(logging.DEBUG, logger="server"):
            running.client().infer("fake", tokens(), request_id="req-42")
            with pytest.raises(InferenceServerException):
                running.client().infer("fake", tokens(seq=17), request_id="req-43")
            with pytest.raises(InferenceServerException):
                running.client().infer("fake", tokens(seq=18))  # no id: the server makes one up
    ok = [r for r in caplog.records if r.getMessage() == "ModelInfer ok"]
    assert ok and ok[0].request_id == "req-42" and ok[0].model == "fake" and ok[0].duration_ms > 0
    failed = [r for r in caplog.records if "ModelInfer failed" in r.getMessage()]
    assert failed and failed[0].request_id == "req-43" and failed[0].code == "INVALID_ARGUMENT"
    assert len(failed) == 2 and failed[1].request_id.startswith("kiln-") and failed[1].request_id != "req-43"
    entry = json.loads(JsonFormatter().format(failed[0]))
    assert entry["request_id"] == "req-43" and entry["level"] == "INFO" and "dim 1 (seq) is 17" in entry["message"]
