"""The rest of the KServe v2 / Triton surface over a real socket: statistics, streaming,
repository control, per-model health, request parameters, overload, deadlines, cancellation,
message size limits and text requests. Clients are tritonclient and plain stubs built from
tritonclient's own protocol modules."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from optimize.runtime.errors import EngineError
from tests.server.harness import RunningServer, fake_repository, int64_inputs, running_server
from tests.server.fakes import EchoEngine, FakeEngine, FakeTextEngine, expected_features, token_manifest

RPC_TIMEOUT_S = 20.0


def token_inputs(ids: np.ndarray) -> list[grpcclient.InferInput]:
    return int64_inputs({"input_ids": ids, "attention_mask": np.ones_like(ids)})


def ids(batch: int = 1, seq: int = 6, start: int = 0) -> np.ndarray:
    return (np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) + start) % 100


def raw_request(model: str = "fake", batch: int = 1, seq: int = 6, start: int = 0, request_id: str = "",
                **parameters: int) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    tokens = ids(batch, seq, start)
    for name, array in (("input_ids", tokens), ("attention_mask", np.ones_like(tokens))):
        request.inputs.add(name=name, datatype="INT64", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    for key, value in parameters.items():
        request.parameters[key].int64_param = value
    return request


def wait_until(condition, timeout_s: float = RPC_TIMEOUT_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# -- statistics -------------------------------------------------------------------------------------

def test_model_statistics_count_requests_samples_executions_and_durations():
    engine = FakeEngine(delay_s=0.02)
    with running_server(fake_repository(engine, max_batch_size=8, max_queue_delay_us=20_000)) as running:
        client = running.client()
        done = threading.Barrier(4)

        def one(i: int) -> None:
            client.infer("fake", token_inputs(ids(batch=2, start=i)), client_timeout=RPC_TIMEOUT_S)
            done.wait(RPC_TIMEOUT_S)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        done.wait(RPC_TIMEOUT_S)
        with pytest.raises(InferenceServerException):
            client.infer("fake", token_inputs(ids(seq=17)))  # invalid: counted as a failure
        stats = client.get_inference_statistics("fake", as_json=True)["model_stats"]
        everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [s["name"] for s in everything] == ["fake"]
    (model,) = stats
    assert model["version"] == "1"
    assert int(model["inference_count"]) == 6 and int(model["execution_count"]) == len(engine.calls)
    infer = model["inference_stats"]
    assert int(infer["success"]["count"]) == 3 and int(infer["fail"]["count"]) == 1
    assert int(infer["queue"]["count"]) == 3 and int(infer["compute_infer"]["count"]) == 3
    assert int(infer["compute_infer"]["ns"]) >= 3 * 15_000_000  # each request is charged its batch's run
    assert int(infer["success"]["ns"]) >= int(infer["queue"]["ns"]) + int(infer["compute_infer"]["ns"]) // 2
    assert sum(int(b["compute_infer"]["count"]) for b in model["batch_stats"]) == len(engine.calls)
    assert int(model["last_inference"]) > 1_700_000_000_000  # ms since the epoch


def test_a_text_requests_tokenization_counts_as_compute_input():
    engine = FakeTextEngine(tokenize_delay_s=0.1)
    with running_server(fake_repository(engine, max_batch_size=8)) as running:
        running.client().infer("fake", [text_input([b"x yy"])], client_timeout=RPC_TIMEOUT_S)
        infer = running.client().get_inference_statistics("fake", as_json=True)["model_stats"][0]["inference_stats"]
    assert int(infer["compute_input"]["ns"]) >= 90_000_000  # Triton counts preparing the inputs there


def test_statistics_of_an_unknown_model_are_not_found(fake_server: RunningServer):
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope'") as info:
        fake_server.client().get_inference_statistics("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


# -- streaming --------------------------------------------------------------------------------------

def test_stream_infer_answers_every_request_and_reports_errors_in_band(fake_server: RunningServer):
    answers: queue.Queue = queue.Queue()
    client = fake_server.client()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(4):
            client.async_stream_infer("fake", token_inputs(ids(start=i)), request_id=f"s{i}")
        client.async_stream_infer("fake", token_inputs(ids(seq=17)), request_id="bad")
        client.async_stream_infer("fake", token_inputs(ids(start=9)), request_id="after")
        got = [answers.get(timeout=RPC_TIMEOUT_S) for _ in range(6)]
    finally:
        client.stop_stream()
    ok = {r.get_response().id: r for r, e in got if e is None}
    errors = [e for r, e in got if e is not None]
    assert set(ok) == {"s0", "s1", "s2", "s3", "after"}
    np.testing.assert_array_equal(ok["s2"].as_numpy("features"), expected_features(ids(start=2), np.ones_like(ids())))
    assert len(errors) == 1 and "dim 1 (seq) is 17" in str(errors[0])


def test_stream_requests_batch_together(fake_engine: FakeEngine):
    fake_engine.delay_s = 0.05
    with running_server(fake_repository(fake_engine, max_batch_size=8, max_queue_delay_us=30_000)) as running:
        with grpc.insecure_channel(running.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            requests = [raw_request(start=i, request_id=str(i)) for i in range(6)]
            requests[0].parameters["triton_enable_empty_final_response"].bool_param = True
            responses = list(stub.ModelStreamInfer(iter(requests), timeout=RPC_TIMEOUT_S))
    assert sorted(r.infer_response.id for r in responses) == [str(i) for i in range(6)]
    assert all(not r.error_message for r in responses)
    flagged = [r for r in responses if r.infer_response.id == "0"][0]
    assert flagged.infer_response.parameters["triton_final_response"].bool_param  # perf_analyzer --streaming
    assert max(fake_engine.calls) > 1, fake_engine.calls


# -- repository control -----------------------------------------------------------------------------

def fake_loader(path: Path) -> FakeEngine:
    if not (path / "engine").exists():
        raise EngineError(f"{path} is not an engine directory: manifest.json not found")
    return FakeEngine(token_manifest(name=path.parent.name))


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    """`<tmp>/repo` with models alpha and beta, a broken one and an empty directory; next to
    it, outside the repository, `<tmp>/escaped` looks like a loadable model."""
    repo = tmp_path / "repo"
    for name in ("alpha", "beta"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "engine").write_text("")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "empty").mkdir()
    (tmp_path / "escaped" / "1").mkdir(parents=True)
    (tmp_path / "escaped" / "1" / "engine").write_text("")
    return repo


def test_repository_index_lists_ready_and_unavailable_models_with_reasons(repo_dir: Path):
    with running_server(repo_dir, loader=fake_loader) as running:
        index = {m["name"]: m for m in running.client().get_model_repository_index(as_json=True)["models"]}
    assert index["alpha"]["state"] == "READY" and index["alpha"]["version"] == "1"
    assert index["broken"]["state"] == "UNAVAILABLE" and "manifest.json not found" in index["broken"]["reason"]
    assert index["empty"]["state"] == "UNAVAILABLE" and "escaped" not in index


def test_load_and_unload_are_refused_unless_model_control_is_explicit(repo_dir: Path):
    with running_server(repo_dir, loader=fake_loader) as running:
        with pytest.raises(InferenceServerException, match="model control mode 'none'") as info:
            running.client().unload_model("alpha")
        assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert running.client().is_model_ready("alpha")


def test_explicit_control_loads_only_what_is_asked_then_loads_and_unloads_on_request(repo_dir: Path):
    with running_server(repo_dir, loader=fake_loader, model_control_mode="explicit",
                        startup_models=("alpha",)) as running:
        client = running.client()
        assert client.is_model_ready("alpha") and not client.is_model_ready("beta")
        client.load_model("beta")
        assert client.is_model_ready("beta")
        assert client.infer("beta", token_inputs(ids())).as_numpy("lengths").tolist() == [6]
        client.load_model("beta")  # a reload keeps serving
        assert client.is_model_ready("beta")
        client.unload_model("alpha")
        assert not client.is_model_ready("alpha")
        with pytest.raises(InferenceServerException, match="'alpha' is not available: unloaded") as info:
            client.infer("alpha", token_inputs(ids()))
        assert info.value.status() == "StatusCode.NOT_FOUND"
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["alpha"] == {"name": "alpha", "state": "UNAVAILABLE", "reason": "unloaded"}
        with pytest.raises(InferenceServerException, match="load failed for model 'broken'") as info:
            client.load_model("broken")
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"  # as Triton's failed load


def test_every_load_failure_is_invalid_argument_with_its_reason_also_in_the_index(repo_dir: Path):
    """Triton answers a failed RepositoryModelLoad INVALID_ARGUMENT "load failed for model ...",
    whatever the cause; RepositoryIndex then gives the same reason."""
    (repo_dir / "misconfigured" / "1").mkdir(parents=True)
    (repo_dir / "misconfigured" / "1" / "engine").write_text("")
    (repo_dir / "misconfigured" / "config.toml").write_text('instances = "two"\n')
    (repo_dir / "exploding" / "1").mkdir(parents=True)
    failing = {"exploding"}

    def loader(path: Path) -> FakeEngine:
        if path.parent.name in failing:
            raise RuntimeError("onnxruntime exploded\nwith a second line")
        return fake_loader(path)

    causes = {"broken": "manifest.json not found", "empty": "has no version directory",
              "misconfigured": "instances must be an integer", "exploding": "RuntimeError: onnxruntime exploded"}
    with running_server(repo_dir, loader=loader, model_control_mode="explicit", startup_models=("alpha",)) as running:
        client = running.client()
        for name, cause in causes.items():
            with pytest.raises(InferenceServerException, match=f"load failed for model '{name}': .*{cause}") as info:
                client.load_model(name)
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT", name
        client.unload_model("beta")  # an unloaded model that then fails to load shows why, not "unloaded"
        failing.add("beta")
        with pytest.raises(InferenceServerException, match="load failed for model 'beta'"):
            client.load_model("beta")
        failing.add("alpha")  # a served model whose reload fails keeps serving the loaded version
        with pytest.raises(InferenceServerException, match="load failed for model 'alpha'"):
            client.load_model("alpha")
        assert client.infer("alpha", token_inputs(ids())).as_numpy("lengths").tolist() == [6]
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    for name, cause in causes.items():
        assert index[name]["state"] == "UNAVAILABLE" and cause in index[name]["reason"], index[name]
    assert index["exploding"]["reason"] == "RuntimeError: onnxruntime exploded with a second line"  # one line
    assert index["beta"]["reason"] == "RuntimeError: onnxruntime exploded with a second line"
    assert index["alpha"]["state"] == "READY"


def test_a_text_request_tokenizing_while_its_model_is_reloaded_is_served_by_the_new_version(repo_dir: Path):
    engines: list[FakeTextEngine] = []

    def text_loader(path: Path) -> FakeEngine:
        engines.append(FakeTextEngine(tokenize_delay_s=0.5))
        return engines[-1]

    with running_server(repo_dir, loader=text_loader, model_control_mode="explicit",
                        startup_models=("alpha",)) as running:
        with ThreadPoolExecutor(1) as pool:
            text = pool.submit(running.client().infer, "alpha", [text_input([b"x yy"])], client_timeout=RPC_TIMEOUT_S)
            wait_until(lambda: engines[0].fake_pipeline.calls)
            running.client().load_model("alpha")  # while the first version's pipeline tokenizes
            assert text.result().as_numpy("features").tolist() == [[3, 1, 2, 3]]
    old, new = engines
    assert old.fake_pipeline.calls == new.fake_pipeline.calls == [["x yy"]]  # tokenized again for the new one
    assert old.calls == [] and new.calls == [1]


@pytest.mark.parametrize("name", ["../escaped", "..", ".", "alpha/../beta", "/etc", "", ".hidden", "a\x00b",
                                  "..\\escaped", "alpha/1"])
def test_model_names_cannot_reach_outside_the_repository(repo_dir: Path, name: str):
    assert (repo_dir / "../escaped/1/engine").exists()  # what a path-joining server would load
    loaded: list[Path] = []

    def recording_loader(path: Path) -> FakeEngine:
        loaded.append(path)
        return fake_loader(path)

    with running_server(repo_dir, loader=recording_loader, model_control_mode="explicit",
                        startup_models=()) as running:
        with grpc.insecure_channel(running.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name=name),
                                         timeout=RPC_TIMEOUT_S)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name=name),
                                           timeout=RPC_TIMEOUT_S)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert loaded == []


def test_grpc_health_reports_each_model_and_follows_unload(repo_dir: Path):
    with running_server(repo_dir, loader=fake_loader, model_control_mode="explicit") as running:
        with grpc.insecure_channel(running.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(service: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S).status

            assert status("alpha") == health_pb2.HealthCheckResponse.SERVING
            running.client().unload_model("alpha")
            assert status("alpha") == health_pb2.HealthCheckResponse.NOT_SERVING
            running.client().load_model("alpha")
            assert status("alpha") == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                status("never-heard-of")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


# -- request parameters, overload, deadlines, cancellation ------------------------------------------

def test_the_timeout_parameter_rejects_a_request_still_queued_after_it():
    engine = FakeEngine(delay_s=0.5)
    with running_server(fake_repository(engine, max_batch_size=1)) as running:
        with grpc.insecure_channel(running.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            busy = stub.ModelInfer.future(raw_request(start=1), timeout=RPC_TIMEOUT_S)
            wait_until(lambda: engine.running == 1)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(raw_request(start=2, timeout=50_000), timeout=RPC_TIMEOUT_S)  # 50 ms
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Request timeout expired" in info.value.details()
            busy.result()
    assert engine.calls == [1]


@pytest.mark.parametrize("parameter, value, message", [
    ("priority", "high", "'priority' must be an integer"),
    ("timeout", -5, "'timeout' must be >= 0"),
    ("sequence_id", 7, "does not support sequence batching"),
    ("truncate", 1, "'truncate' must be a boolean (bool_param), got int64_param"),
])
def test_bad_request_parameters_are_invalid_argument(fake_server: RunningServer, parameter: str, value: object,
                                                     message: str):
    request = raw_request()
    if isinstance(value, str):
        request.parameters[parameter].string_param = value
    else:
        request.parameters[parameter].int64_param = value
    with grpc.insecure_channel(fake_server.url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()


def test_raw_and_typed_contents_together_are_invalid_argument_in_tritons_words(fake_server: RunningServer,
                                                                               fake_engine: FakeEngine):
    request = raw_request()
    request.inputs[0].contents.int64_contents.extend(range(6))  # the same data, twice: which would count?
    with grpc.insecure_channel(fake_server.url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == ("contents field must not be specified when using raw_input_contents for "
                                    "'input_ids' for model 'fake'")
    assert fake_engine.calls == []


def test_a_full_queue_answers_unavailable_at_once_and_the_server_recovers():
    engine = FakeEngine(delay_s=0.3)
    with running_server(fake_repository(engine, max_batch_size=1, max_queue_size=1)) as running:
        with grpc.insecure_channel(running.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            running_call = stub.ModelInfer.future(raw_request(start=1), timeout=RPC_TIMEOUT_S)
            wait_until(lambda: engine.running == 1)
            queued_call = stub.ModelInfer.future(raw_request(start=2), timeout=RPC_TIMEOUT_S)
            wait_until(lambda: len(running.server.service.schedulers["fake"].batcher) == 1)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(raw_request(start=3), timeout=RPC_TIMEOUT_S)
            assert time.monotonic() - started < 0.2  # refused at once, not after waiting
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Exceeds maximum queue size" in info.value.details()
            running_call.result(), queued_call.result()
            stub.ModelInfer(raw_request(start=4), timeout=RPC_TIMEOUT_S)
        stats = running.client().get_inference_statistics("fake", as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["fail"]["count"]) == 1 and engine.calls == [1, 1, 1]


def test_a_request_whose_client_deadline_passes_in_the_queue_is_never_executed():
    engine = FakeEngine(delay_s=0.4)
    with running_server(fake_repository(engine, max_batch_size=1)) as running:
        with grpc.insecure_channel(running.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            busy = stub.ModelInfer.future(raw_request(start=1), timeout=RPC_TIMEOUT_S)
            wait_until(lambda: engine.running == 1)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(raw_request(start=2), timeout=0.1)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            busy.result()
            time.sleep(0.1)
        assert len(running.server.service.schedulers["fake"].batcher) == 0
    assert engine.calls == [1]


def test_a_cancelled_call_leaves_the_queue_and_is_never_executed():
    engine = FakeEngine(delay_s=0.4)
    with running_server(fake_repository(engine, max_batch_size=1)) as running:
        queue_ = running.server.service.schedulers["fake"].batcher
        with grpc.insecure_channel(running.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            busy = stub.ModelInfer.future(raw_request(start=1), timeout=RPC_TIMEOUT_S)
            wait_until(lambda: engine.running == 1)
            doomed = stub.ModelInfer.future(raw_request(start=2), timeout=RPC_TIMEOUT_S)
            wait_until(lambda: len(queue_) == 1)
            doomed.cancel()
            wait_until(lambda: len(queue_) == 0)
            busy.result()
        stats = running.client().get_inference_statistics("fake", as_json=True)["model_stats"][0]
    assert engine.calls == [1]
    assert int(stats["inference_stats"]["fail"]["count"]) == 1  # counted, as Triton's CANCELED


def test_messages_above_the_configured_limit_are_refused_and_the_server_keeps_serving():
    repo = fake_repository(EchoEngine(), name="echo", max_batch_size=4)
    with running_server(repo, max_message_bytes=1024 * 1024) as running:
        client = running.client()

        def echo(width: int) -> np.ndarray:
            x = np.ones((1, width), np.float32)
            tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return client.infer("echo", [tensor], client_timeout=RPC_TIMEOUT_S).as_numpy("y")

        with pytest.raises(InferenceServerException) as info:
            echo(512 * 1024)  # 2 MiB
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert echo(1024).shape == (1, 1024)


def test_messages_over_the_default_64_mib_are_resource_exhausted():
    repo = fake_repository(EchoEngine(), name="echo", max_batch_size=4)
    with running_server(repo) as running:
        client = running.client()
        x = np.zeros((4, 4 * 1024 * 1024), np.float32)  # 64 MiB of data, plus the message's framing
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as info:
            client.infer("echo", [tensor], client_timeout=RPC_TIMEOUT_S)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        del tensor, x
        small = grpcclient.InferInput("x", [1, 8], "FP32")
        small.set_data_from_numpy(np.ones((1, 8), np.float32))
        assert client.infer("echo", [small], client_timeout=RPC_TIMEOUT_S).as_numpy("y").tolist() == [[2.0] * 8]


# -- text requests ------------------------------------------------------------------------------------

def text_input(texts: list[bytes], shape: list[int] | None = None) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("text", shape or [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object).reshape(shape or [len(texts), 1]))
    return tensor


def test_text_requests_get_the_pipeline_output_and_the_interface_is_advertised():
    engine = FakeTextEngine()
    with running_server(fake_repository(engine, max_batch_size=8, interface="text")) as running:
        client = running.client()
        meta = client.get_model_metadata("fake", as_json=True)
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("text", "BYTES", ["-1", "1"])]
        assert [t["name"] for t in meta["outputs"]] == ["features"]
        config = client.get_model_config("fake").config
        assert [(i.name, list(i.dims)) for i in config.input] == [("text", [1])]
        result = client.infer("fake", [text_input([b"a bb ccc", b"dddd"])])
        assert [o.name for o in result.get_response().outputs] == ["features"]
        # features: sum, first, last (0: padding to the batch's longest text), masked sum
        np.testing.assert_array_equal(result.as_numpy("features"), [[6, 1, 3, 6], [4, 4, 0, 4]])
        flat = client.infer("fake", [text_input([b"x yy"], shape=[1])])  # [n] is accepted too
        assert flat.as_numpy("features").tolist() == [[3, 1, 2, 3]]
        tokens = client.infer("fake", token_inputs(ids()))  # the engine's own inputs still work
        assert tokens.as_numpy("lengths").tolist() == [6]


def test_texts_over_max_text_bytes_are_refused_unless_the_request_asks_to_truncate():
    engine = FakeTextEngine()
    with running_server(fake_repository(engine, max_batch_size=8, max_text_bytes=20)) as running:
        client = running.client()
        long = b"a bb ccc dddd eeeee ffffff"  # 26 bytes
        with pytest.raises(InferenceServerException, match=r"input 'text' element 1 is 26 bytes, more than model "
                                                           r"'fake' accepts per text \(max_text_bytes 20\)") as info:
            client.infer("fake", [text_input([b"ok", long])], client_timeout=RPC_TIMEOUT_S)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert engine.fake_pipeline.calls == []  # refused before anything tokenized it
        result = client.infer("fake", [text_input([long])], parameters={"truncate": True},
                              client_timeout=RPC_TIMEOUT_S)
        assert engine.fake_pipeline.calls == [["a bb ccc dddd eeeee "]]  # its first 20 bytes
        assert result.as_numpy("features").tolist() == [[15, 1, 5, 15]]  # words of 1 to 5 letters
        parameters = client.get_model_config("fake").config.parameters
        assert parameters["max_text_bytes"].string_value == "20"
        assert parameters["max_request_text_bytes"].string_value == str(20 * 8)  # a batch of such texts


def test_a_slow_tokenization_never_holds_up_token_requests():
    engine = FakeTextEngine(tokenize_delay_s=1.5)  # one instance: it used to tokenize there
    with running_server(fake_repository(engine, max_batch_size=8)) as running:
        with ThreadPoolExecutor(1) as pool:
            text = pool.submit(running.client().infer, "fake", [text_input([b"x yy"])], client_timeout=RPC_TIMEOUT_S)
            wait_until(lambda: engine.fake_pipeline.calls)
            client, latencies = running.client(), []
            for i in range(5):
                started = time.monotonic()
                client.infer("fake", token_inputs(ids(start=i)), client_timeout=RPC_TIMEOUT_S)
                latencies.append(time.monotonic() - started)
            tokenizing = not text.done()
            assert text.result().as_numpy("features").tolist() == [[3, 1, 2, 3]]
    assert tokenizing and max(latencies) < 0.5, latencies


@pytest.mark.parametrize("make, message", [
    (lambda: [text_input([b"\xff\xfe"])], "not valid UTF-8"),
    (lambda: [text_input([b"a"] * 9)], "9 texts, more than model 'fake' accepts"),
    (lambda: [text_input([b"a", b"b"], shape=[1, 2])], r"expected \[n\] or \[n, 1\]"),
    (lambda: [text_input([b"a"]), *token_inputs(ids())], "send texts or tokens, not both"),
])
def test_bad_text_requests_are_invalid_argument(make, message: str):  # type: ignore[no-untyped-def]
    engine = FakeTextEngine()
    with running_server(fake_repository(engine, max_batch_size=8)) as running:
        with pytest.raises(InferenceServerException, match=message) as info:
            running.client().infer("fake", make())
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert engine.calls == []
