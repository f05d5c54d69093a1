"""Engines with task heads, served: a classifier answers its text requests with its declared
`logits`, is not offered as an embedding model, and a sentence-pair engine takes token ids."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

import optimize
from optimize.config import CompileConfig
from server import Model, ModelConfig
from server.errors import ConfigError
from tests.optimize.task_models import task_dir
from tests.server.harness import RunningServer, int64_inputs, make_repository, running_server
from tests.server.http.helpers import base_url, fetch, openai_error

SENTENCES = ["A man is playing a guitar.", "How do I reset my password?"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, minilm_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task-engines")
    config = CompileConfig(backend="onnxruntime", max_batch=4, max_seq=32)
    return {kind: optimize.compile(task_dir(kind, root / "src", minilm_model_dir), root / kind, config).path
            for kind in ("classifier", "cross_encoder")}


@pytest.fixture(scope="module")
def served(engines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = make_repository(tmp_path_factory.mktemp("repo"), engines["classifier"], name="sentiment")
    make_repository(repository.parent, engines["cross_encoder"], name="reranker")
    with running_server(repository, http_port=0) as running:
        yield running


def test_a_classifier_answers_texts_with_its_logits(served: RunningServer, engines: dict[str, Path]):
    client = grpcclient.InferenceServerClient(served.url)
    metadata = client.get_model_metadata("sentiment")
    assert [o.name for o in metadata.outputs] == ["logits"]
    text = grpcclient.InferInput("text", [len(SENTENCES), 1], "BYTES")
    text.set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=object).reshape(-1, 1))
    got = client.infer("sentiment", [text]).as_numpy("logits")
    engine = optimize.load(engines["classifier"])
    assert engine.pipeline is not None
    want = engine.run(engine.pipeline.tokenize(SENTENCES))["logits"]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_only_feature_extraction_engines_are_embedding_models(served: RunningServer):
    listed = fetch(base_url(served) + "/v1/models").json()
    assert [m["id"] for m in listed["data"]] == []
    reply = fetch(base_url(served) + "/v1/embeddings", {"model": "sentiment", "input": "hello"})
    error = openai_error(reply, 400)
    assert "text-classification engine, not an embedding model" in error["message"]


def test_a_pair_engine_scores_token_ids_with_token_types(served: RunningServer, engines: dict[str, Path]):
    engine = optimize.load(engines["cross_encoder"])
    assert engine.pipeline is not None and engine.pipeline.pair
    feeds = engine.pipeline.tokenize_pairs(["reset my password"] * 2, SENTENCES)
    client = grpcclient.InferenceServerClient(served.url)
    got = client.infer("reranker", int64_inputs(feeds)).as_numpy("logits")
    np.testing.assert_allclose(got, engine.run(feeds)["logits"], atol=1e-5)
    with pytest.raises(ConfigError, match="scores sentence pairs, which are sent as token ids"):
        Model("reranker", 1, engine, ModelConfig(interface="text"))
