"""OpenAI's embeddings API on the HTTP port: the official `openai` SDK against the real
all-MiniLM-L6-v2 engine (compiled once per session) gets what the engine computes in-process,
in both encodings, truncated, from texts and from token ids, with true token counts; every
refusal is answered in OpenAI's error shape with the status a client expects (plain HTTP
requests against fake engines)."""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

import optimize
from server.http.common import json_response
from tests.server.fakes import FakeEngine, FakeTextEngine
from tests.server.harness import RunningServer, fake_repository, make_repository
from tests.server.http.helpers import base_url, fetch, http_server, openai_error

SENTENCES = ["A man is playing a guitar.", "Someone is strumming a guitar.", "How do I reset my password?",
             "Ünïcödé and emoji 🎸 survive the trip.", "short",
             "A much longer sentence, so that the texts of one request have very different numbers of tokens "
             "and padding would show in any count that included it."]


@pytest.fixture(scope="module")
def minilm_server(minilm_engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = make_repository(tmp_path_factory.mktemp("minilm-openai"), minilm_engine_dir, name="minilm",
                                 max_batch_size=8, max_queue_delay_us=2000)
    with http_server(repository) as running:
        yield running


@pytest.fixture(scope="module")
def minilm_engine(minilm_engine_dir: Path) -> optimize.Engine:
    return optimize.load(minilm_engine_dir)


@pytest.fixture(scope="module")
def client(minilm_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url(minilm_server)}/v1", api_key="unused", max_retries=0, timeout=60)


def reference(engine: optimize.Engine, sentences: list[str]) -> np.ndarray:
    """The engine's own embedding of each sentence, computed in-process one at a time."""
    pipeline = engine.pipeline
    assert pipeline is not None
    return np.concatenate([engine.run(pipeline.tokenize([s]))[pipeline.output] for s in sentences])


def cosines(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))


def test_the_sdk_gets_the_engines_embeddings_as_floats_with_true_token_counts(client: openai.OpenAI,
                                                                             minilm_engine: optimize.Engine):
    response = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    assert response.object == "list" and response.model == "minilm"
    assert [(d.object, d.index) for d in response.data] == [("embedding", i) for i in range(len(SENTENCES))]
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert got.shape == (len(SENTENCES), 384)
    assert cosines(got, reference(minilm_engine, SENTENCES)).min() > 0.9999
    # Tokens the engine saw: special tokens included, padding to the longest sentence not.
    pipeline = minilm_engine.pipeline
    assert pipeline is not None
    true_count = sum(int(pipeline.tokenize([s])["attention_mask"].sum()) for s in SENTENCES)
    padded = pipeline.tokenize(SENTENCES)["input_ids"].size
    assert response.usage.prompt_tokens == response.usage.total_tokens == true_count < padded


def test_the_sdks_default_base64_decodes_to_the_same_embeddings(client: openai.OpenAI,
                                                                 minilm_engine: optimize.Engine):
    raw = client.embeddings.with_raw_response.create(model="minilm", input=SENTENCES[:3])
    sent = json.loads(raw.http_request.content)
    assert sent["encoding_format"] == "base64"  # what the SDK asks for when not told otherwise
    wire = json.loads(raw.http_response.content)["data"][0]["embedding"]
    assert isinstance(wire, str) and len(base64.b64decode(wire)) == 384 * 4  # little-endian float32
    got = np.array([d.embedding for d in raw.parse().data], dtype=np.float32)
    assert cosines(got, reference(minilm_engine, SENTENCES[:3])).min() > 0.9999


def test_floats_are_sent_short_and_read_back_as_the_base64_float32s(client: openai.OpenAI):
    raw = client.embeddings.with_raw_response.create(model="minilm", input=SENTENCES[:2], encoding_format="float")
    numbers = json.loads(raw.http_response.content)["data"][0]["embedding"]
    # a float32's shortest exact digits (at most 9 significant), not a widened double's 17
    assert all(len(repr(n)) <= 16 for n in numbers)
    packed = client.embeddings.with_raw_response.create(model="minilm", input=SENTENCES[:2])
    wire = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in json.loads(packed.http_response.content)["data"]]
    assert np.array_equal(np.array([d.embedding for d in raw.parse().data], dtype=np.float32), np.array(wire))


def test_float32s_written_as_json_read_back_as_the_same_float32_at_every_magnitude():
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(20_000) * 10.0 ** rng.integers(-45, 38, 20_000)).astype(np.float32)
    values = np.concatenate([values, np.array([0.0, -0.0, 1.0, 0.1, 3.4028235e38, 1e-45, -1e-45], np.float32)])
    printed = json_response({"embedding": values}).body
    back = np.array(json.loads(printed)["embedding"], dtype=np.float32)
    assert np.array_equal(back, values) and np.array_equal(np.signbit(back), np.signbit(values))


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_dimensions_keep_the_first_ones_scaled_back_to_unit_length(client: openai.OpenAI,
                                                                   minilm_engine: optimize.Engine, encoding: str):
    response = client.embeddings.create(model="minilm", input=SENTENCES[:2], dimensions=64, encoding_format=encoding)
    # Asked for explicitly, base64 reaches the caller undecoded: little-endian float32.
    got = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") if encoding == "base64" else d.embedding
                    for d in response.data], dtype=np.float32)
    assert got.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    truncated = reference(minilm_engine, SENTENCES[:2])[:, :64]
    assert cosines(got, truncated).min() > 0.9999


def test_token_ids_embed_like_the_text_they_tokenize(client: openai.OpenAI, minilm_engine: optimize.Engine):
    pipeline = minilm_engine.pipeline
    assert pipeline is not None
    ids = [pipeline.tokenize([s])["input_ids"][0].tolist() for s in SENTENCES[:3]]
    several = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    one = client.embeddings.create(model="minilm", input=ids[0], encoding_format="float")
    expected = reference(minilm_engine, SENTENCES[:3])
    assert cosines(np.array([d.embedding for d in several.data]), expected).min() > 0.9999
    assert cosines(np.array([one.data[0].embedding]), expected[:1]).min() > 0.9999
    assert several.usage.prompt_tokens == sum(len(i) for i in ids) and one.usage.prompt_tokens == len(ids[0])


def test_more_inputs_than_max_batch_size_are_split_and_answered_in_order(minilm_server: RunningServer,
                                                                          client: openai.OpenAI,
                                                                          minilm_engine: optimize.Engine):
    sentences = [f"Sentence number {i} of a long list." for i in range(19)]  # max_batch_size is 8
    stats = minilm_server.server.service.schedulers["minilm"].stats
    before = stats.success.count
    response = client.embeddings.create(model="minilm", input=sentences, encoding_format="float")
    assert [d.index for d in response.data] == list(range(19))
    got = np.array([d.embedding for d in response.data])
    assert cosines(got, reference(minilm_engine, sentences)).min() > 0.9999
    assert stats.success.count - before == 3  # 8 + 8 + 3, counted like any other request


def test_models_lists_the_embedding_models(client: openai.OpenAI):
    assert [m.id for m in client.models.list()] == ["minilm"]
    card = client.models.retrieve("minilm")
    assert (card.id, card.object, card.owned_by) == ("minilm", "model", "kiln") and card.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_the_sdk_raises_the_error_class_of_each_refusal(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="minilm", input="text", dimensions=385)
    assert bad.value.param == "dimensions" and "384" in bad.value.message  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="text-embedding-3-small", input="text")
    assert missing.value.code == "model_not_found"  # type: ignore[attr-defined]
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(model="minilm", input=[])


# -- refusals, over plain HTTP against fake engines ---------------------------------------------

@pytest.fixture(scope="module")
def fake_server() -> Iterator[RunningServer]:
    """Model "fake" with a text pipeline (4-wide features, ids < 100) and "tokens" without one."""
    repository = fake_repository(FakeTextEngine(), name="fake", max_batch_size=8)
    repository.models.update(fake_repository(FakeEngine(), name="tokens", max_batch_size=8).models)
    with http_server(repository, max_message_bytes=64 * 1024) as running:
        yield running


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 422, None),
    ([1, 2], 422, None),
    ({"model": "fake", "input": "x", "temperature": 1}, 422, "temperature"),
    ({"model": "fake"}, 422, "input"),
    ({"input": "x"}, 422, "model"),
    ({"model": "fake", "input": []}, 422, "input"),
    ({"model": "fake", "input": ""}, 422, "input"),
    ({"model": "fake", "input": ["a", 1]}, 422, "input"),
    ({"model": "fake", "input": [[1, 2], []]}, 422, "input"),
    ({"model": "fake", "input": [True, False]}, 422, "input"),
    ({"model": "fake", "input": ["x"] * 2049}, 422, "input"),
    ({"model": "fake", "input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
    ({"model": "fake", "input": "x", "dimensions": 0}, 422, "dimensions"),
    ({"model": "fake", "input": "x", "dimensions": 5}, 400, "dimensions"),
    ({"model": "fake", "input": [[1, 2, 100]]}, 400, None),
    ({"model": "fake", "input": [[2**70]]}, 400, "input"),
    ({"model": "tokens", "input": "x"}, 400, "model"),
    ({"model": "nope", "input": "x"}, 404, "model"),
])
def test_refusals_have_openais_shape_and_the_expected_status(fake_server: RunningServer, body, status, param):  # type: ignore[no-untyped-def]
    error = openai_error(fetch(f"{base_url(fake_server)}/v1/embeddings", body), status)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    if status == 404:
        assert error["code"] == "model_not_found"


def test_a_too_large_body_is_413_also_when_it_inflates_past_the_limit(fake_server: RunningServer):
    url = f"{base_url(fake_server)}/v1/embeddings"
    big = {"model": "fake", "input": ["word " * 20_000]}
    openai_error(fetch(url, big), 413)
    bomb = gzip.compress(json.dumps(big).encode())
    assert len(bomb) < 64 * 1024
    openai_error(fetch(url, bomb, headers={"content-encoding": "gzip"}), 413)
    small = gzip.compress(json.dumps({"model": "fake", "input": "a b"}).encode())
    assert fetch(url, small, headers={"content-encoding": "gzip"}).json()["usage"]["prompt_tokens"] == 2


def test_unknown_routes_and_methods_answer_in_openais_shape(fake_server: RunningServer):
    openai_error(fetch(f"{base_url(fake_server)}/v1/completions", {"model": "fake"}), 404)
    reply = fetch(f"{base_url(fake_server)}/v1/embeddings")
    openai_error(reply, 405)
    assert reply.headers["allow"] == "POST"


def test_a_full_queue_is_429_with_retry_after():
    engine = FakeTextEngine(delay_s=0.5)
    repository = fake_repository(engine, max_batch_size=1, max_queue_size=1)
    with http_server(repository) as running:
        url, scheduler = f"{base_url(running)}/v1/embeddings", running.server.service.schedulers["fake"]
        replies: list[int] = []
        threads = [threading.Thread(target=lambda: replies.append(fetch(url, {"model": "fake", "input": "a"}).status))
                   for _ in range(2)]
        threads[0].start()
        wait_until(lambda: engine.running == 1)  # the first runs ...
        threads[1].start()
        wait_until(lambda: len(scheduler.batcher) == 1)  # ... the second waits in the queue ...
        reply = fetch(url, {"model": "fake", "input": "a"})  # ... and the third finds it full
        for thread in threads:
            thread.join(30)
    error = openai_error(reply, 429)
    assert error["type"] == "rate_limit_error" and "Exceeds maximum queue size" in error["message"]
    assert reply.headers["retry-after"] == "1"
    assert sorted(replies) == [200, 200]


def wait_until(condition, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)
