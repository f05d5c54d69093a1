"""The server with a real packed engine: a tiny BERT compiled by the `triton` backend with its
padding-removal pass (on CPU the kernels' references run), served through tritonclient. The
server must pick the `Packed` layout for it, put requests of different lengths in one batch with
no padding (rows back to back, `cu_seqlens`), and give every request exactly what the engine
computes for it alone — the contract `server.layout.Packed` and `Engine.run_packed` share."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

import optimize
from server.layout import Packed
from tests.optimize.hf_random import TINY_BERT, hf_dir
from tests.server.harness import RunningServer, int64_inputs, make_repository, running_server

import kiln_kernels  # noqa: F401  (registers torch.ops.kiln)

VOCAB = TINY_BERT["vocab_size"]


@pytest.fixture(scope="module")
def packed_engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "bert" / "1"
    config = optimize.CompileConfig(backend="triton", max_batch=8, max_seq=32, verify_samples=2)
    engine = optimize.compile(hf_dir("bert", 2, **TINY_BERT), out, config)
    assert engine.accepts_packed, "the remove_padding pass should make this engine packed"
    return out


@pytest.fixture(scope="module")
def packed_server(packed_engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = make_repository(tmp_path_factory.mktemp("repo"), packed_engine_dir, name="bert",
                                 max_batch_size=8, max_queue_delay_us=20_000)
    with running_server(repository) as running:
        yield running


def request(rng: np.random.Generator, rows: int, seq: int) -> dict[str, np.ndarray]:
    """`rows` sequences of exactly `seq` real tokens (a request's own padding is its business)."""
    return {"input_ids": rng.integers(1, VOCAB, size=(rows, seq), dtype=np.int64),
            "attention_mask": np.ones((rows, seq), dtype=np.int64)}


def infer(client: grpcclient.InferenceServerClient, feeds: dict[str, np.ndarray]) -> grpcclient.InferResult:
    return client.infer("bert", int64_inputs(feeds), client_timeout=60.0)


def test_server_batches_mixed_lengths_packed_and_answers_each_as_the_engine_alone(packed_server: RunningServer,
                                                                               packed_engine_dir: Path):
    scheduler = packed_server.server.service.schedulers["bert"]
    assert isinstance(scheduler.model.layout, Packed), "an engine that accepts packed batches gets the packed layout"
    config = packed_server.client().get_model_config("bert").config
    assert config.parameters["packed_batches"].string_value == "true"

    rng = np.random.default_rng(7)
    shapes = [(1, 3), (2, 17), (1, 32), (1, 1), (2, 9), (1, 25)]
    requests = [request(rng, rows, seq) for rows, seq in shapes]
    executions = scheduler.stats.execution_count
    client = packed_server.client()
    with ThreadPoolExecutor(len(requests)) as pool:  # all queued within the 20 ms delay
        results = list(pool.map(lambda feeds: infer(client, feeds), requests))
    assert scheduler.stats.execution_count - executions < len(requests), "no two lengths shared a batch"

    engine = optimize.load(packed_engine_dir)
    outputs = [s.name for s in engine.outputs]
    assert "last_hidden_state" in outputs
    for feeds, result in zip(requests, results, strict=True):
        expected = engine.run(feeds)
        for name in outputs:
            got = result.as_numpy(name)
            assert got.shape == expected[name].shape, name
            np.testing.assert_allclose(got, expected[name], rtol=1e-4, atol=1e-4, err_msg=name)
