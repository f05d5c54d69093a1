"""Every model family served end to end, from one server: each family's engine (compiled with one
CPU backend, the backends taking turns so every one of them is served: eager, triton with its
passes, onnxruntime, openvino, ctranslate2 for the encoders it converts) is answered through
tritonclient with real sentences as text, and the answers are the embeddings transformers itself
computes in-process for the same text (its tokenizer over the same tokenizer.json, the model's
last hidden state pooled as the directory's sentence-transformers modules say). The decoder
embedder (Qwen2, last-token pooling) is also sent token ids padded on the left and on the right,
as transformers' tokenizer pads them.

Engines come from the session's family engines (tests/conftest.py), which
tests/optimize/test_families.py compiles on every backend: run in one session, serving adds only
the server and the requests.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

import optimize
from tests.optimize.families import FAMILIES, pooled
from tests.server.harness import RunningServer, int64_inputs, make_repository, running_server

SENTENCES = ["A man is playing a guitar.", "Someone is strumming a guitar.", "How do I reset my password?",
             "Ünïcödé and emoji 🎸 survive the trip.", "short"]
# Two families per backend. CTranslate2 converts only BERT, DistilBERT, RoBERTa and XLM-RoBERTa
# encoders; the triton backend packs ModernBERT's global-attention layer and Qwen2's layer.
BACKENDS = {"bert": "ctranslate2", "xlm-roberta": "ctranslate2", "roberta": "onnxruntime", "distilbert": "onnxruntime",
            "mpnet": "openvino", "deberta-v2": "openvino", "electra": "eager", "gpt2": "eager",
            "modernbert": "triton", "qwen2": "triton"}
RPC_TIMEOUT_S = 60.0
MAX_TOKENS = 32  # the engines' max_seq (families.compile_config)


def backend_of(family: str) -> str:
    """The backend `family` is served with (onnxruntime where CTranslate2 is not installed)."""
    backend = BACKENDS[family]
    if backend == "ctranslate2" and importlib.util.find_spec("ctranslate2") is None:
        return "onnxruntime"
    return backend


def test_every_family_is_served():
    assert set(BACKENDS) == set(FAMILIES)
    assert set(BACKENDS.values()) == {"eager", "triton", "onnxruntime", "openvino", "ctranslate2"}


@pytest.fixture(scope="module")
def engines(family_engine: Callable[[str, str], Path]) -> dict[str, optimize.Engine]:
    return {family: optimize.load(family_engine(family, backend_of(family))) for family in FAMILIES}


@pytest.fixture(scope="module")
def served(engines: dict[str, optimize.Engine], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("family-repo")
    for family, engine in engines.items():
        repository = make_repository(root, engine.path, name=family, max_batch_size=4, max_queue_delay_us=2000)
    with running_server(repository) as running:
        yield running


@functools.cache
def reference(path: Path) -> tuple[Any, torch.nn.Module]:
    """transformers' fast tokenizer over the directory's tokenizer.json, and its model."""
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    return tokenizer, transformers.AutoModel.from_pretrained(str(path)).eval()


def transformers_embeddings(path: Path, family: str, batch: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The embedding transformers computes for each of `SENTENCES` alone (or for the padded
    token rows `batch`), pooled as the family's modules say."""
    tokenizer, model = reference(path)
    spec = FAMILIES[family]
    rows = [batch] if batch is not None else [tokenizer(s, truncation=True, max_length=MAX_TOKENS, return_tensors="np")
                                              for s in SENTENCES]
    out = []
    with torch.no_grad():
        for row in rows:
            ids, mask = torch.from_numpy(row["input_ids"]), torch.from_numpy(row["attention_mask"])
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            out.append(pooled(hidden, mask, spec.pooling, spec.normalize).numpy())
    return np.concatenate(out)


def text_input(texts: list[str]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
    return tensor


@pytest.mark.parametrize("family", FAMILIES)
def test_sentences_sent_as_text_get_the_embeddings_transformers_computes(
        family: str, served: RunningServer, engines: dict[str, optimize.Engine], family_dirs: dict[str, Path]):
    engine = engines[family]
    assert engine.backend == backend_of(family)
    if engine.backend == "triton":
        assert engine.accepts_packed, "served as packed batches"
    client = served.client()
    groups = [SENTENCES[:2], SENTENCES[2:]]  # two requests, batched and tokenized together
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(
            # truncate: the emoji sentence is longer than the 32 tokens the engines read under the
            # tiny trained vocabularies, and a longer text is refused unless the request allows
            # cutting it (transformers' tokenizer cuts it the same way in transformers_embeddings)
            lambda texts: client.infer(family, [text_input(texts)], parameters={"truncate": True},
                                       client_timeout=RPC_TIMEOUT_S), groups))
    got = np.concatenate([r.as_numpy("sentence_embedding") for r in results])
    np.testing.assert_allclose(got, transformers_embeddings(family_dirs[family], family), rtol=1e-4, atol=2e-5)
    assert len({tuple(np.round(row, 4)) for row in got}) == len(SENTENCES), "every sentence has its own embedding"
    if FAMILIES[family].normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_decoder_embedder_answers_token_ids_padded_on_either_side(side: str, served: RunningServer,
                                                                      family_dirs: dict[str, Path]):
    tokenizer, _ = reference(family_dirs["qwen2"])
    tokenizer.pad_token, tokenizer.padding_side = "<|endoftext|>", side
    batch = dict(tokenizer(SENTENCES[:4], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="np"))
    batch = {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    column = 0 if side == "left" else -1
    assert not batch["attention_mask"][:, column].all(), f"the batch must be padded on the {side}"
    got = served.client().infer("qwen2", int64_inputs(batch), client_timeout=RPC_TIMEOUT_S)
    want = transformers_embeddings(family_dirs["qwen2"], "qwen2", batch)
    np.testing.assert_allclose(got.as_numpy("sentence_embedding"), want, rtol=1e-4, atol=2e-5)
    alone = transformers_embeddings(family_dirs["qwen2"], "qwen2")[:4]
    np.testing.assert_allclose(want, alone, atol=2e-5)  # padding changes nothing, whichever side
