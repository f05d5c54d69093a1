"""Model families served end to end: sentences sent as text through tritonclient come back as the
embeddings the engine computes in-process with its own pipeline, for a RoBERTa encoder with a
trained byte-level BPE tokenizer (ONNX Runtime) and for a Qwen2 decoder used as an embedder
(last-token pooling, packed batches on the triton backend). Every family's compile is checked
in tests/optimize/test_families.py; serving two representative ones keeps CI short."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

import optimize
from optimize.runtime.config import CompileConfig
from tests.optimize.families import family_dir
from tests.server.harness import RunningServer, make_repository, running_server

SENTENCES = ["A man is playing a guitar.", "Someone is strumming a guitar.", "How do I reset my password?",
             "Ünïcödé and emoji 🎸 survive the trip.", "short"]
SERVED = {"roberta": "onnxruntime", "qwen2": "triton"}
RPC_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, minilm_model_dir: Path) -> dict[str, optimize.Engine]:
    root = tmp_path_factory.mktemp("family-e2e")
    return {family: optimize.compile(family_dir(family, root / "src", minilm_model_dir), root / family,
                                     CompileConfig(backend=backend, max_batch=4, max_seq=32, verify_samples=1))
            for family, backend in SERVED.items()}


@pytest.fixture(scope="module")
def served(engines: dict[str, optimize.Engine], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("family-repo")
    for family, engine in engines.items():
        repository = make_repository(root, engine.path, name=family, max_batch_size=4, max_queue_delay_us=2000)
    with running_server(repository) as running:
        yield running


def text_input(texts: list[str]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
    return tensor


@pytest.mark.parametrize("family", SERVED)
def test_sentences_sent_as_text_get_the_engines_own_embeddings(family: str, served: RunningServer,
                                                               engines: dict[str, optimize.Engine]):
    engine = engines[family]
    assert engine.accepts_packed == (SERVED[family] == "triton")
    client = served.client()
    groups = [SENTENCES[:2], SENTENCES[2:]]  # two requests, batched and tokenized together
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(
            # truncate: the emoji sentence is longer than the 32 tokens the engines read under
            # RoBERTa's tokenizer, and a longer text is refused unless the request allows cutting it
            lambda texts: client.infer(family, [text_input(texts)], parameters={"truncate": True},
                                       client_timeout=RPC_TIMEOUT_S), groups))
    got = np.concatenate([r.as_numpy("sentence_embedding") for r in results])
    pipeline = engine.pipeline
    assert pipeline is not None
    want = np.concatenate([engine.run(pipeline.tokenize([s]))["sentence_embedding"] for s in SENTENCES])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if family == "qwen2":  # normalized, as its sentence-transformers modules say
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
