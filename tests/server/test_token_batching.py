"""Token-budget batching end to end, through real clients (the openai SDK, tritonclient gRPC and
HTTP) against the real all-MiniLM-L6-v2 engine: requests whose texts exceed the model's token
budget are split across batches and answered whole, in order, with what the engine computes
in-process; texts longer than the model reads are refused (413 over HTTP, INVALID_ARGUMENT over
gRPC) unless the request asks to truncate them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import optimize
from tests.server.harness import RunningServer, make_repository
from tests.server.http.helpers import base_url, http_server

WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old oak tree near "
         "the river bank").split()
# 4 to 40 words, against a budget of 32 padded tokens per batch (the engine's max_seq is 64).
SENTENCES = [" ".join(WORDS[i % 7:i % 7 + n]) for i, n in enumerate((4, 40, 9, 22, 5, 31, 14, 8))]
TOO_LONG = " ".join(WORDS * 4)  # 88 words: over the engine's 64 tokens, far under its byte limit


@pytest.fixture(scope="module")
def served(minilm_engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = make_repository(tmp_path_factory.mktemp("budget"), minilm_engine_dir, name="minilm",
                                 max_batch_size=8, max_batch_tokens=32, max_queue_delay_us=2000)
    with http_server(repository) as running:
        yield running


@pytest.fixture(scope="module")
def engine(minilm_engine_dir: Path) -> optimize.Engine:
    return optimize.load(minilm_engine_dir)


def reference(engine: optimize.Engine, texts: list[str]) -> np.ndarray:
    """Each text's embedding computed in-process, one at a time (no padding)."""
    pipeline = engine.pipeline
    assert pipeline is not None
    return np.concatenate([engine.run(pipeline.tokenize([t]))[pipeline.output] for t in texts])


def text_input(module, texts: list[str]):  # type: ignore[no-untyped-def]
    tensor = module.InferInput("text", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
    return tensor


def executions(served: RunningServer) -> tuple[int, int]:
    stats = served.client().get_inference_statistics("minilm").model_stats[0]
    return stats.inference_count, stats.execution_count


def test_requests_over_the_token_budget_are_split_and_answered_whole_in_order(served: RunningServer,
                                                                              engine: optimize.Engine):
    want = reference(engine, SENTENCES)
    pipeline = engine.pipeline
    assert pipeline is not None
    tokens = int(pipeline.tokenize(SENTENCES)["attention_mask"].sum())
    assert tokens > 3 * 32  # one request's texts need more than three batches of 32 tokens
    client = openai.OpenAI(base_url=f"{base_url(served)}/v1", api_key="unused", max_retries=0, timeout=60)
    before = executions(served)
    alone = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in alone.data], want, atol=2e-5)
    inferences, runs = (after - first for after, first in zip(executions(served), before, strict=True))
    assert inferences == len(SENTENCES) and runs > 3

    answers: dict[str, np.ndarray] = {}

    def over_openai(name: str, texts: list[str]) -> None:
        response = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
        answers[name] = np.array([d.embedding for d in response.data], dtype=np.float32)

    def over_grpc(name: str, texts: list[str]) -> None:
        result = grpcclient.InferenceServerClient(served.url).infer("minilm", [text_input(grpcclient, texts)])
        answers[name] = result.as_numpy("sentence_embedding")

    def over_http(name: str, texts: list[str]) -> None:
        client_ = httpclient.InferenceServerClient(f"127.0.0.1:{served.server.http_port}")
        answers[name] = client_.infer("minilm", [text_input(httpclient, texts)]).as_numpy("sentence_embedding")

    def over_grpc_hidden(name: str, texts: list[str]) -> None:
        result = grpcclient.InferenceServerClient(served.url).infer(
            "minilm", [text_input(grpcclient, texts)], outputs=[grpcclient.InferRequestedOutput("last_hidden_state")])
        answers[name] = result.as_numpy("last_hidden_state")

    # Four requests at once: their texts mix in batches by length and come back to each in order;
    # the one that reads the token-axis output gets it whole, though the others' do not carry it.
    jobs = [("openai", over_openai, SENTENCES), ("grpc", over_grpc, SENTENCES[::-1]),
            ("http", over_http, SENTENCES[2:]), ("hidden", over_grpc_hidden, SENTENCES[:2])]
    threads = [threading.Thread(target=job, args=(name, texts)) for name, job, texts in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    np.testing.assert_allclose(answers["openai"], want, atol=2e-5)
    np.testing.assert_allclose(answers["grpc"], want[::-1], atol=2e-5)
    np.testing.assert_allclose(answers["http"], want[2:], atol=2e-5)
    tokenized = pipeline.tokenize(SENTENCES[:2])
    hidden, real = engine.run(tokenized)["last_hidden_state"], tokenized["attention_mask"] == 1
    assert answers["hidden"].shape == hidden.shape
    np.testing.assert_allclose(answers["hidden"][real], hidden[real], atol=2e-4)  # padding positions aside


def test_a_text_over_the_models_tokens_is_refused_naming_the_limit_unless_truncated(served: RunningServer,
                                                                                    engine: optimize.Engine):
    grpc = grpcclient.InferenceServerClient(served.url)
    with pytest.raises(InferenceServerException, match="more than 64 tokens, the most model 'minilm' reads") as info:
        grpc.infer("minilm", [text_input(grpcclient, ["short", TOO_LONG])])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    reply = httpx.post(f"{base_url(served)}/v1/embeddings", json={"model": "minilm", "input": [TOO_LONG]}, timeout=60)
    assert reply.status_code == 413 and "truncate=true" in reply.json()["error"]["message"]
    kserve = httpx.post(f"{base_url(served)}/v2/models/minilm/infer", timeout=60, json={
        "inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [TOO_LONG]}]})
    assert kserve.status_code == 413 and "64 tokens" in kserve.json()["error"]

    want = reference(engine, [TOO_LONG])  # the pipeline keeps the first 64 tokens
    cut = grpc.infer("minilm", [text_input(grpcclient, [TOO_LONG])], parameters={"truncate": True})
    np.testing.assert_allclose(cut.as_numpy("sentence_embedding"), want, atol=2e-5)
    client = openai.OpenAI(base_url=f"{base_url(served)}/v1", api_key="unused", max_retries=0, timeout=60)
    response = client.embeddings.create(model="minilm", input=TOO_LONG, encoding_format="float",
                                        extra_body={"truncate": True})
    np.testing.assert_allclose([response.data[0].embedding], want, atol=2e-5)
    assert response.usage.prompt_tokens == 64
