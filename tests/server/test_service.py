"""The KServe v2 service over a real socket, spoken to by standard clients: tritonclient, and
plain gRPC stubs built from tritonclient's own protocol modules."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.server.harness import RunningServer, fake_repository, running_server
from tests.server.fakes import EchoEngine, FakeEngine, expected_features

RPC_TIMEOUT_S = 20.0


def token_inputs(ids: np.ndarray, mask: np.ndarray | None = None) -> list[grpcclient.InferInput]:
    mask = np.ones_like(ids) if mask is None else mask
    inputs = []
    for name, array in (("input_ids", ids), ("attention_mask", mask)):
        tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def ids(batch: int = 2, seq: int = 6, start: int = 0) -> np.ndarray:
    return (np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) + start) % 100


@pytest.fixture
def stub(fake_server: RunningServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """A plain gRPC stub built from tritonclient's generated modules (not the server's)."""
    with grpc.insecure_channel(fake_server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def raw_request(**arrays: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="fake")
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype="INT64", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


# -- health and metadata ----------------------------------------------------------------------

def test_server_and_model_report_live_and_ready(fake_server: RunningServer):
    client = fake_server.client()
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fake") and client.is_model_ready("fake", "1")
    assert not client.is_model_ready("fake", "2")
    assert not client.is_model_ready("nope")


def test_server_metadata_names_kiln(fake_server: RunningServer):
    meta = fake_server.client().get_server_metadata(as_json=True)
    assert meta["name"] == "kiln" and meta["version"]
    assert {"model_configuration", "model_repository", "statistics"} <= set(meta["extensions"])


def test_model_metadata_reports_dynamic_dims_as_minus_one(fake_server: RunningServer):
    meta = fake_server.client().get_model_metadata("fake", as_json=True)
    assert meta["name"] == "fake" and meta["versions"] == ["1"] and meta["platform"] == "kiln_fake"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("input_ids", "INT64", ["-1", "-1"]), ("attention_mask", "INT64", ["-1", "-1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("features", "FP32", ["-1", "4"]), ("lengths", "INT64", ["-1"])]


def test_model_config_reports_batching_and_dims_without_the_batch_dim(fake_server: RunningServer):
    config = fake_server.client().get_model_config("fake").config
    assert config.name == "fake" and config.backend == "fake"
    assert config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 20_000
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input_ids", grpcclient.model_config_pb2.TYPE_INT64, [-1]),
        ("attention_mask", grpcclient.model_config_pb2.TYPE_INT64, [-1])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("features", [4]), ("lengths", [])]
    assert config.instance_group[0].count == 1
    assert config.version_policy.latest.num_versions == 1


def test_a_model_without_batching_reports_max_batch_size_zero_and_full_shapes():
    with running_server(fake_repository(FakeEngine(), max_batch_size=0)) as running:
        client = running.client()
        config = client.get_model_config("fake").config
        assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
        assert list(config.input[0].dims) == [-1, -1]
        assert client.get_model_metadata("fake", as_json=True)["inputs"][0]["shape"] == ["-1", "-1"]


def test_metadata_of_an_unknown_model_is_not_found(fake_server: RunningServer):
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope'") as info:
        fake_server.client().get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_grpc_health_service_reports_serving(fake_server: RunningServer):
    with grpc.insecure_channel(fake_server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services_and_describes_the_protocol(fake_server: RunningServer):
    with grpc.insecure_channel(fake_server.url) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.ModelInferRequest"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
        ]
        listed, protocol, health = list(reflection.ServerReflectionInfo(iter(requests), timeout=RPC_TIMEOUT_S))
    names = {s.name for s in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert protocol.file_descriptor_response.file_descriptor_proto, protocol.error_response
    assert health.file_descriptor_response.file_descriptor_proto, health.error_response


# -- inference ----------------------------------------------------------------------------------

def test_infer_with_raw_contents_returns_every_output_and_echoes_the_id(fake_server: RunningServer):
    tokens = ids(batch=3, seq=5)
    mask = np.ones_like(tokens)
    mask[:, -2:] = 0
    result = fake_server.client().infer("fake", token_inputs(tokens, mask), request_id="abc-1")
    np.testing.assert_array_equal(result.as_numpy("features"), expected_features(tokens, mask))
    np.testing.assert_array_equal(result.as_numpy("lengths"), [3, 3, 3])
    response = result.get_response()
    assert response.id == "abc-1" and response.model_name == "fake" and response.model_version == "1"


def test_infer_with_typed_contents_and_unknown_parameters(stub: service_pb2_grpc.GRPCInferenceServiceStub):
    tokens = ids(batch=2, seq=4)
    request = service_pb2.ModelInferRequest(model_name="fake", id="typed")
    request.parameters["triton_enable_empty_final_response"].bool_param = True  # perf_analyzer sends it
    request.parameters["some_future_option"].string_param = "ignored"
    for name, array in (("input_ids", tokens), ("attention_mask", np.ones_like(tokens))):
        tensor = request.inputs.add(name=name, datatype="INT64", shape=array.shape)
        tensor.contents.int64_contents.extend(array.reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert response.id == "typed"
    assert [o.name for o in response.outputs] == ["features", "lengths"]
    features = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_array_equal(features, expected_features(tokens, np.ones_like(tokens)))


def test_only_the_requested_outputs_are_returned(fake_server: RunningServer):
    outputs = [grpcclient.InferRequestedOutput("lengths")]
    result = fake_server.client().infer("fake", token_inputs(ids()), outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["lengths"]
    assert result.as_numpy("features") is None


def test_concurrent_clients_are_served_in_real_batches():
    engine = FakeEngine(delay_s=0.03)
    with running_server(fake_repository(engine, max_batch_size=8, max_queue_delay_us=10_000)) as running:
        client = running.client()  # one channel, many concurrent RPCs, as tritonclient users do

        def one(i: int) -> bool:
            tokens = ids(batch=1 + i % 2, seq=8, start=i)
            result = client.infer("fake", token_inputs(tokens), client_timeout=RPC_TIMEOUT_S)
            return np.array_equal(result.as_numpy("features"), expected_features(tokens, np.ones_like(tokens)))

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(32)))
    assert all(answers)
    assert sum(engine.calls) == sum(1 + i % 2 for i in range(32))
    assert max(engine.calls) > 1, f"no batch was formed: {engine.calls}"
    assert len(engine.calls) < 32


def test_messages_larger_than_grpcs_4_mib_default_pass_both_ways():
    repo = fake_repository(EchoEngine(), name="echo", max_batch_size=4)
    with running_server(repo) as running:
        x = np.random.default_rng(0).standard_normal((2, 1024 * 1024)).astype(np.float32)  # 8 MiB
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = running.client().infer("echo", [tensor], client_timeout=RPC_TIMEOUT_S)
        np.testing.assert_array_equal(result.as_numpy("y"), 2 * x)


# -- bad requests -------------------------------------------------------------------------------

def _bad(**arrays: np.ndarray) -> service_pb2.ModelInferRequest:
    good = {"input_ids": ids(), "attention_mask": np.ones_like(ids())}
    return raw_request(**{**good, **arrays})


def _short_raw() -> service_pb2.ModelInferRequest:
    request = _bad()
    request.raw_input_contents[1] = request.raw_input_contents[1][:-3]
    return request


def _wrong_datatype() -> service_pb2.ModelInferRequest:
    request = _bad(attention_mask=np.ones((2, 6), np.float32))
    request.inputs[1].datatype = "FP32"
    return request


def _unknown_model() -> service_pb2.ModelInferRequest:
    request = _bad()
    request.model_name = "bert"
    return request


def _unknown_output() -> service_pb2.ModelInferRequest:
    request = _bad()
    request.outputs.add(name="logits")
    return request


NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
BAD_REQUESTS = [  # (request factory, expected code, regex the details must match)
    pytest.param(_unknown_model, NOT_FOUND, "Request for unknown model: 'bert' is not found", id="unknown model"),
    pytest.param(_wrong_datatype, INVALID, "input 'attention_mask' has datatype FP32, expected INT64",
                 id="wrong datatype"),
    pytest.param(lambda: _bad(input_ids=ids().reshape(-1), attention_mask=np.ones(12, np.int64)),
                 INVALID, "input 'input_ids' has rank 1, expected rank 2", id="wrong rank"),
    pytest.param(lambda: _bad(input_ids=ids(seq=17), attention_mask=np.ones((2, 17), np.int64)),
                 INVALID, r"input 'input_ids' dim 1 \(seq\) is 17, allowed range is \[1, 16\]", id="sequence too long"),
    pytest.param(lambda: _bad(attention_mask=np.ones((2, 5), np.int64)),
                 INVALID, r"input 'attention_mask' dim 1 \(seq\) is 5, but input 'input_ids' has 6",
                 id="sequence lengths differ"),
    pytest.param(lambda: _bad(attention_mask=np.ones((3, 6), np.int64)),
                 INVALID, "input 'attention_mask' has batch size 3, other inputs have 2", id="batch sizes differ"),
    pytest.param(_short_raw, INVALID,
                 r"input 'attention_mask' has 93 bytes of raw data, expected 96 for shape \[2, 6\]",
                 id="byte length does not match shape"),
    pytest.param(lambda: raw_request(input_ids=ids()), INVALID, r"missing input\(s\) 'attention_mask'",
                 id="missing input"),
    pytest.param(lambda: _bad(token_type_ids=ids()), INVALID, "unknown input 'token_type_ids'", id="unknown input"),
    pytest.param(lambda: _bad(input_ids=np.full((2, 6), 100, np.int64)),
                 INVALID, r"input 'input_ids' holds value 100, outside the allowed range \[0, 99\]",
                 id="token id out of range"),
    pytest.param(lambda: _bad(input_ids=ids(batch=9), attention_mask=np.ones((9, 6), np.int64)),
                 INVALID, "batch size 9, more than model 'fake' accepts", id="batch above max_batch_size"),
    pytest.param(_unknown_output, INVALID, "unknown output 'logits'", id="unknown output"),
]


@pytest.mark.parametrize("make, code, message", BAD_REQUESTS)
def test_bad_requests_are_answered_with_a_status_naming_the_problem_and_the_server_keeps_serving(
        make, code: grpc.StatusCode, message: str, fake_server: RunningServer,  # type: ignore[no-untyped-def]
        stub: service_pb2_grpc.GRPCInferenceServiceStub, fake_engine: FakeEngine):
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(make(), timeout=RPC_TIMEOUT_S)
    assert info.value.code() == code
    assert re.search(message, info.value.details()), info.value.details()
    assert fake_engine.calls == []  # rejected before it was queued
    result = fake_server.client().infer("fake", token_inputs(ids()))
    assert result.as_numpy("features").shape == (2, 4)


def test_engine_failures_are_answered_internal_with_the_reason(fake_server: RunningServer, fake_engine: FakeEngine):
    fake_engine.fail_with = RuntimeError("kernel launch failed")
    with pytest.raises(InferenceServerException, match="model 'fake' failed: kernel launch failed") as info:
        fake_server.client().infer("fake", token_inputs(ids()))
    assert info.value.status() == "StatusCode.INTERNAL"
    fake_engine.fail_with = None
    assert fake_server.client().infer("fake", token_inputs(ids())).as_numpy("lengths").tolist() == [6, 6]


@pytest.mark.parametrize(
    "call, name",
    [(lambda c: c.get_system_shared_memory_status(), "SystemSharedMemoryStatus"),
     (lambda c: c.get_cuda_shared_memory_status(), "CudaSharedMemoryStatus"),
     (lambda c: c.get_trace_settings(), "TraceSetting"),
     (lambda c: c.get_log_settings(), "LogSettings")],
)
def test_rpcs_not_implemented_answer_unimplemented_cleanly(fake_server: RunningServer, call, name: str):  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException, match=f"{name} is not implemented") as info:
        call(fake_server.client())
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert fake_server.client().is_server_live()


# -- shutdown -----------------------------------------------------------------------------------

def test_graceful_stop_answers_in_flight_requests_then_refuses_new_ones():
    engine = FakeEngine(delay_s=0.3)
    with running_server(fake_repository(engine, max_batch_size=2, max_queue_delay_us=0)) as running:
        client = running.client()
        results: list[object] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            try:
                out = client.infer("fake", token_inputs(ids(batch=1, start=i)), client_timeout=RPC_TIMEOUT_S)
                answer: object = out.as_numpy("lengths").tolist()
            except InferenceServerException as exc:
                answer = exc
            with lock:
                results.append(answer)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        queue = running.server.service.schedulers["fake"].batcher
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while sum(engine.calls) + len(queue) < 5 and time.monotonic() < deadline:  # all accepted: running or queued
            time.sleep(0.005)
        assert len(queue) > 0, "the test needs requests still queued when the shutdown begins"
        running.call(running.server.stop(grace_s=10))
        for t in threads:
            t.join(RPC_TIMEOUT_S)
        assert results == [[6]] * 5, results
        with pytest.raises(InferenceServerException) as info:
            grpcclient.InferenceServerClient(running.url).infer("fake", token_inputs(ids()), client_timeout=5)
        assert info.value.status() == "StatusCode.UNAVAILABLE"
