"""KServe v2 REST on the HTTP port: `tritonclient.http` against the real all-MiniLM-L6-v2 engine
(texts and token ids, binary and JSON tensors, metadata, config, readiness, statistics) and
against fake engines (repository control, compression, statistics shared with gRPC); every
refusal over plain HTTP with Triton's `{"error": ...}` and the status a client expects."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import optimize
from server.stats import CANCELED
from tests.server.fakes import FakeEngine, FakeTextEngine, expected_features, token_manifest
from tests.server.harness import RunningServer, fake_repository, make_repository
from tests.server.http.helpers import base_url, fetch, http_server, kserve_error

TIMEOUT_S = 60.0
SENTENCES = ["A man is playing a guitar.", "Someone is strumming a guitar.", "How do I reset my password?",
             "Ünïcödé and emoji 🎸 survive the trip.", "short"]


def client_of(running: RunningServer, **options: object) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{running.server.http_port}", connection_timeout=TIMEOUT_S,
                                            network_timeout=TIMEOUT_S, **options)


def text_input(texts: list[str], binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("text", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1), binary_data=binary)
    return tensor


def int64_inputs(feeds: dict[str, np.ndarray], binary: bool = True) -> list[httpclient.InferInput]:
    inputs = []
    for name, array in feeds.items():
        tensor = httpclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(np.asarray(array, dtype=np.int64), binary_data=binary)
        inputs.append(tensor)
    return inputs


@pytest.fixture(scope="module")
def minilm_server(minilm_engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = make_repository(tmp_path_factory.mktemp("minilm-kserve"), minilm_engine_dir, name="minilm",
                                 max_batch_size=8, max_queue_delay_us=2000, sequence_buckets=[16, 32])
    with http_server(repository) as running:
        yield running


@pytest.fixture(scope="module")
def minilm_engine(minilm_engine_dir: Path) -> optimize.Engine:
    return optimize.load(minilm_engine_dir)


def test_tritonclient_http_reads_health_metadata_config_and_readiness(minilm_server: RunningServer):
    client = client_of(minilm_server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("minilm") and client.is_model_ready("minilm", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("minilm", "2")
    assert client.get_server_metadata()["name"] == "kiln"
    meta = client.get_model_metadata("minilm")
    assert meta["versions"] == ["1"] and meta["platform"] == "kiln_onnxruntime"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1])]
    assert {t["name"]: t["shape"] for t in meta["outputs"]} == {"last_hidden_state": [-1, -1, 384],
                                                               "sentence_embedding": [-1, 384]}
    assert client.get_model_metadata("minilm", "1") == meta
    config = client.get_model_config("minilm")
    assert config["max_batch_size"] == 8 and config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("input_ids", "TYPE_INT64", [-1]), ("attention_mask", "TYPE_INT64", [-1])]
    assert config["parameters"]["sequence_buckets"] == {"string_value": "16,32"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_texts_get_the_embeddings_of_the_engines_own_pipeline(minilm_server: RunningServer,
                                                               minilm_engine: optimize.Engine, binary: bool):
    client = client_of(minilm_server)
    output = httpclient.InferRequestedOutput("sentence_embedding", binary_data=binary)
    result = client.infer("minilm", [text_input(SENTENCES, binary)], outputs=[output], request_id="texts-1")
    got = result.as_numpy("sentence_embedding")
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    assert result.get_response()["id"] == "texts-1"
    pipeline = minilm_engine.pipeline
    assert pipeline is not None
    expected = np.concatenate([minilm_engine.run(pipeline.tokenize([s]))["sentence_embedding"] for s in SENTENCES])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_token_ids_get_every_output_the_engine_computes(minilm_server: RunningServer,
                                                       minilm_engine: optimize.Engine, binary: bool):
    rng = np.random.default_rng(5)
    ids = rng.integers(1000, 30522, size=(3, 12), dtype=np.int64)
    ids[:, 0] = 101
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    feeds = {"input_ids": ids * mask, "attention_mask": mask}
    client = client_of(minilm_server)
    if binary:  # no outputs named: tritonclient asks for all of them as binary data
        result = client.infer("minilm", int64_inputs(feeds, binary=True))
    else:
        outputs = [httpclient.InferRequestedOutput(n, binary_data=False)
                   for n in ("sentence_embedding", "last_hidden_state")]
        result = client.infer("minilm", int64_inputs(feeds, binary=False), outputs=outputs)
    expected = minilm_engine.run(feeds)
    for name in ("sentence_embedding", "last_hidden_state"):
        np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_statistics_count_http_requests_like_grpc_ones(minilm_server: RunningServer):
    client = client_of(minilm_server)
    before = client.get_inference_statistics("minilm")["model_stats"][0]
    client.infer("minilm", [text_input(["one more"], binary=True)])
    after = client.get_inference_statistics("minilm")["model_stats"][0]
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert after["inference_count"] == before["inference_count"] + 1
    assert isinstance(after["inference_stats"]["success"]["ns"], int)  # numbers, not protobuf's int64 strings
    over_grpc = minilm_server.client().get_inference_statistics("minilm", as_json=True)["model_stats"][0]
    assert over_grpc["inference_stats"]["success"]["count"] == str(after["inference_stats"]["success"]["count"])
    assert [s["name"] for s in client.get_inference_statistics()["model_stats"]] == ["minilm"]


# -- fake engines -----------------------------------------------------------------------------

@pytest.fixture
def fake_server() -> Iterator[RunningServer]:
    with http_server(fake_repository(FakeTextEngine(), max_batch_size=8), max_message_bytes=64 * 1024) as running:
        yield running


def test_compressed_requests_are_inflated(fake_server: RunningServer):
    ids = np.arange(1, 7, dtype=np.int64).reshape(1, 6)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for algorithm in ("gzip", "deflate"):
        result = client_of(fake_server).infer("fake", int64_inputs(feeds), request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("features"), expected_features(ids, np.ones_like(ids)))


def fake_loader(path: Path) -> FakeEngine:
    return FakeEngine(token_manifest(name=path.parent.name))


def test_load_unload_and_index_follow_explicit_model_control(tmp_path: Path):
    repo = tmp_path / "repo"
    for name in ("alpha", "beta"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "engine").write_text("")
    with http_server(repo, loader=fake_loader, model_control_mode="explicit", startup_models=("alpha",)) as running:
        client = client_of(running)
        assert client.is_model_ready("alpha") and not client.is_model_ready("beta")
        client.load_model("beta")
        assert client.is_model_ready("beta")
        client.unload_model("alpha")
        assert not client.is_model_ready("alpha")
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index["alpha"] == {"name": "alpha", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}
        assert index["beta"]["state"] == "READY"
        with pytest.raises(InferenceServerException, match="not available: unloaded") as info:
            client.get_model_metadata("alpha")
        assert info.value.status() == "404"


def test_repository_control_is_refused_without_explicit_mode(fake_server: RunningServer):
    message = kserve_error(fetch(f"{base_url(fake_server)}/v2/repository/models/fake/unload", {}), 400)
    assert "model control mode 'none'" in message


def infer_url(running: RunningServer, model: str = "fake") -> str:
    return f"{base_url(running)}/v2/models/{model}/infer"


def tokens_json(**changes: object) -> dict[str, object]:
    """A JSON request of ids [[1, 2, 3]] for the fake engine, `changes` made to `input_ids`
    (None removes a key)."""
    tensor = {"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [[1, 2, 3]], **changes}
    mask = {"name": "attention_mask", "shape": [1, 3], "datatype": "INT64", "data": [1, 1, 1]}
    return {"inputs": [{k: v for k, v in tensor.items() if v is not None}, mask]}


@pytest.mark.parametrize(("body", "status", "words"), [
    (tokens_json(datatype="FP32", data=[1.0, 2.0, 3.0]), 400, "has datatype FP32, expected INT64"),
    (tokens_json(shape=[1, 4]), 400, "expected 32 for shape [1, 4]"),
    (tokens_json(data=[1, 2, 300]), 400, "outside the allowed range"),
    (tokens_json(data=[1.5, 2, 3]), 422, "INT64 data must be integers"),
    (tokens_json(data="1 2 3"), 422, "'data' must be a JSON array"),
    (tokens_json(shape="[1, 3]"), 422, "'shape' must be a list of integers"),
    (tokens_json(data=None, parameters={"binary_data_size": 24}), 422, "runs past the end of the request body"),
    (tokens_json(parameters={"shared_memory_region": "r"}), 400, "shared memory is not supported"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
      "outputs": [{"name": "nope"}]}, 400, "unknown output 'nope'"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
      "parameters": {"sequence_id": 7}}, 400, "does not support sequence batching"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
      "parameters": {"priority": "high"}}, 400, "request parameter 'priority' must be an integer"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [1]}]}, 422, "BYTES data must be strings"),
    ({"inputs": {"name": "text"}}, 422, "'inputs' must be a list of tensors"),
    (b"{", 422, "the inference request is not JSON"),
    (b"\xff\xfe\x00", 422, "not JSON"),
])
def test_bad_infer_requests_get_tritons_error_shape_and_status(fake_server: RunningServer, body, status, words):  # type: ignore[no-untyped-def]
    assert words in kserve_error(fetch(infer_url(fake_server), body), status)


def test_unknown_models_versions_and_routes_are_404(fake_server: RunningServer):
    message = kserve_error(fetch(infer_url(fake_server, "nope"), tokens_json()), 404)
    assert message == "Request for unknown model: 'nope' is not found (served models: fake)"
    message = kserve_error(fetch(f"{base_url(fake_server)}/v2/models/fake/versions/3"), 404)
    assert "version 3 is not found" in message
    assert kserve_error(fetch(f"{base_url(fake_server)}/v2/models/fake/trace/setting"), 404)
    reply = fetch(infer_url(fake_server))  # GET
    kserve_error(reply, 405)
    assert reply.headers["allow"] == "POST"


def test_binary_inputs_and_outputs_follow_the_binary_data_extension(fake_server: RunningServer):
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    header = json.dumps({
        "inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "parameters": {"binary_data_size": 24}},
                   {"name": "attention_mask", "shape": [1, 3], "datatype": "INT64", "data": [1, 1, 1]}],
        "outputs": [{"name": "features", "parameters": {"binary_data": True}}, {"name": "lengths"}],
    }).encode()
    reply = fetch(infer_url(fake_server), header + ids.tobytes(),
                  headers={"inference-header-content-length": str(len(header))})
    assert reply.status == 200, reply.body
    length = int(reply.headers["inference-header-content-length"])
    document = json.loads(reply.body[:length])
    features, lengths = document["outputs"]
    assert features["parameters"] == {"binary_data_size": 16} and "data" not in features
    expected = expected_features(ids, np.ones_like(ids))[0]
    np.testing.assert_array_equal(np.frombuffer(reply.body[length:], "<f4"), expected)
    assert lengths == {"name": "lengths", "datatype": "INT64", "shape": [1], "data": [3]}
    extra = fetch(infer_url(fake_server), header + ids.tobytes() + b"\0",
                  headers={"inference-header-content-length": str(len(header))})
    assert "1 bytes of binary data that no input" in kserve_error(extra, 422)


def test_a_too_large_body_is_413(fake_server: RunningServer):
    body = tokens_json(data=list(range(20_000)), shape=[1, 20_000])
    assert "over this server's limit of 65536" in kserve_error(fetch(infer_url(fake_server), body), 413)


def wait_until(condition, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def in_thread(url: str, body: object, replies: list[int]) -> threading.Thread:
    thread = threading.Thread(target=lambda: replies.append(fetch(url, body).status))  # type: ignore[arg-type]
    thread.start()
    return thread


def test_a_full_queue_is_503_as_in_triton():
    engine = FakeEngine(delay_s=0.5)
    with http_server(fake_repository(engine, max_batch_size=1, max_queue_size=1)) as running:
        scheduler, replies = running.server.service.schedulers["fake"], []
        running_one = in_thread(infer_url(running), tokens_json(), replies)
        wait_until(lambda: engine.running == 1)
        queued_one = in_thread(infer_url(running), tokens_json(), replies)
        wait_until(lambda: len(scheduler.batcher) == 1)
        reply = fetch(infer_url(running), tokens_json())
        running_one.join(30)
        queued_one.join(30)
    assert "Exceeds maximum queue size" in kserve_error(reply, 503)
    assert reply.headers["retry-after"] == "1"
    assert replies == [200, 200]


def test_a_client_that_disconnects_is_taken_out_of_the_queue():
    engine = FakeEngine(delay_s=0.5)
    with http_server(fake_repository(engine, max_batch_size=1)) as running:
        scheduler, replies = running.server.service.schedulers["fake"], []
        busy = in_thread(infer_url(running), tokens_json(), replies)
        wait_until(lambda: engine.running == 1)
        body = json.dumps(tokens_json(data=[[4, 5, 6]])).encode()
        with socket.create_connection(("127.0.0.1", running.server.http_port), timeout=10) as connection:
            connection.sendall(b"POST /v2/models/fake/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                               + f"content-length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: len(scheduler.batcher) == 1)  # queued behind the busy instance
        wait_until(lambda: scheduler.stats.failures[CANCELED] == 1)  # the server noticed the hang-up
        assert len(scheduler.batcher) == 0
        busy.join(30)
    assert replies == [200]
    assert engine.calls == [1]  # the abandoned request never ran


def test_bytes_helpers_agree_with_tritons_layout():
    # The same layout as gRPC's raw contents: a uint32 length before each element.
    from server.http.kserve import _json_values

    raw = struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0)
    assert _json_values("BYTES", raw) == ["hi", ""]
