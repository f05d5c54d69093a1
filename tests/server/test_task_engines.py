"""Engines with task heads, served: every task's text interface answers, through real
tritonclient gRPC and HTTP clients, what transformers itself answers for the same model and
real sentences (its pipelines for classification and NER, sentence-transformers' CrossEncoder
for pairs, the model's own pooled output for embeddings); the interfaces are declared in
ModelMetadata and ModelConfig; token inputs keep working; bad requests are INVALID_ARGUMENT.

Models are tiny random-weight ones (tests/optimize/task_models.py), each compiled with another CPU
backend (the engines are shared with tests/optimize/test_tasks.py through tests/conftest.py), and
all-MiniLM-L6-v2 for embeddings. Classifiers cover the three kinds transformers' pipeline scores
differently: single-label (softmax), multi-label (a sigmoid per label; a RoBERTa with a byte-level
BPE tokenizer) and regression (the raw logit).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import optimize
from server import Model, ModelConfig, Repository
from server.errors import ConfigError
from tests.server.harness import RunningServer, int64_inputs, make_repository, running_server
from tests.server.http.helpers import base_url, fetch, openai_error

SENTENCES = ["The new movie is awesome, I loved every minute of it!", "The food was cold and the service was terrible.",
             "How do I reset my password?", "Berlin is the capital of Germany."]
NER_SENTENCES = ["My name is Wolfgang and I live in Berlin.",
                 "Angela Merkel visited the Eiffel Tower in Paris last summer.",
                 "Hugging Face Inc. is a company based in New York City."]
PAIRS = [("How do I reset my password?", "Click 'Forgot password' on the sign-in page."),
         ("How do I reset my password?", "A man is playing a guitar."),
         ("Where is the Eiffel Tower?", "The Eiffel Tower is in Paris, France.")]
PROTOCOLS = ["grpc", "http"]
TIMEOUT_S = 60.0
# kind (tests/optimize/task_models.py) -> the backend it is compiled with: every CPU backend
# that builds heads builds one (CTranslate2 builds feature extraction only, and refuses heads).
BACKENDS = {"classifier": "onnxruntime", "multilabel": "eager", "regression": "triton", "ner": "triton",
            "cross_encoder": "openvino", "fill_mask": "onnxruntime", "gpt2": "onnxruntime"}
# served model name -> kind
MODELS = {"sentiment": "classifier", "topics": "multilabel", "rating": "regression", "ner": "ner",
          "reranker": "cross_encoder", "masked": "fill_mask", "lm": "gpt2"}
CLASSIFIERS = ("sentiment", "topics", "rating")


@pytest.fixture(scope="module")
def sources(task_source: Callable[[str], Path]) -> dict[str, Path]:
    return {kind: task_source(kind) for kind in BACKENDS}


@pytest.fixture(scope="module")
def engines(task_engine: Callable[[str, str], Path], minilm_engine_dir: Path) -> dict[str, Path]:
    return {**{kind: task_engine(kind, backend) for kind, backend in BACKENDS.items()}, "embedder": minilm_engine_dir}


@pytest.fixture(scope="module")
def served(engines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("repo")
    for model, kind in MODELS.items():
        repository = make_repository(root, engines[kind], name=model, interface="text")
    make_repository(root, engines["embedder"], name="minilm")
    with running_server(repository, http_port=0) as running:
        yield running


def infer(served: RunningServer, protocol: str, model: str, texts: dict[str, list[str]],
          parameters: dict[str, Any] | None = None, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """A text request through tritonclient's `protocol` client: every output it answers."""
    module: Any = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(served.url if protocol == "grpc" else f"127.0.0.1:{served.server.http_port}")
    inputs = []
    for name, values in texts.items():
        tensor = module.InferInput(name, [len(values), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object).reshape(-1, 1))
        inputs.append(tensor)
    requested = [module.InferRequestedOutput(name) for name in outputs] if outputs else None
    options = {"client_timeout": TIMEOUT_S} if protocol == "grpc" else {"timeout": int(TIMEOUT_S * 1e6)}
    result = client.infer(model, inputs, outputs=requested, parameters=parameters, **options)
    response = result.get_response()
    names = [o.name for o in response.outputs] if protocol == "grpc" else [o["name"] for o in response["outputs"]]
    return {name: result.as_numpy(name) for name in names}


@functools.cache
def hf(task: str, path: Path, **options: Any) -> Any:
    import transformers

    return transformers.pipeline(task, model=str(path), **options)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", CLASSIFIERS)
def test_a_classifier_answers_labels_and_scores_as_transformers_pipeline(served: RunningServer,
                                                                         sources: dict[str, Path], protocol: str,
                                                                         model: str):
    reference = hf("text-classification", sources[MODELS[model]])
    config = reference.model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    for parameters, top_k in ((None, 1), ({"top_k": 2}, 2), ({"top_k": 0}, None)):
        got = infer(served, protocol, model, {"text": SENTENCES}, parameters)
        assert list(got) == ["label", "score"]
        want = reference(SENTENCES, top_k=top_k)
        assert got["label"].shape == got["score"].shape == (len(SENTENCES), min(top_k or len(labels), len(labels)))
        assert [[label.decode() for label in row] for row in got["label"]] == [[d["label"] for d in row] for row in want]
        np.testing.assert_allclose(got["score"], [[d["score"] for d in row] for row in want], atol=1e-5)
    if len(labels) > 1:
        assert len({tuple(row) for row in got["label"].tolist()}) > 1, "sentences should rank the labels differently"
    else:  # regression: the raw logit, one value per sentence, of any sign and size
        assert len(set(got["score"][:, 0].round(4))) == len(SENTENCES)
    every = infer(served, protocol, model, {"text": SENTENCES}, {"all_scores": True})
    assert every["label"].tolist() == [[label.encode() for label in labels]] * len(SENTENCES)
    by_label = [{d["label"]: d["score"] for d in row} for row in want]
    np.testing.assert_allclose(every["score"], [[row[n] for n in labels] for row in by_label], atol=1e-5)
    if model == "topics":  # multi-label: independent sigmoids, which need not sum to 1
        assert not np.allclose(every["score"].sum(axis=1), 1.0, atol=0.05)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_token_classifier_answers_entities_with_character_offsets_as_transformers(
        served: RunningServer, sources: dict[str, Path], protocol: str):
    got = infer(served, protocol, "ner", {"text": NER_SENTENCES})["entities"]
    assert got.shape == (len(NER_SENTENCES), 1)
    want = hf("token-classification", sources["ner"], aggregation_strategy="simple")(NER_SENTENCES)
    found = 0
    for text, row, expected in zip(NER_SENTENCES, got[:, 0], want, strict=True):
        entities = json.loads(row)
        assert [list(e) for e in entities] == [["entity_group", "score", "word", "start", "end"]] * len(entities)
        assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in entities] == [
            (e["entity_group"], e["word"], e["start"], e["end"]) for e in expected]
        np.testing.assert_allclose([e["score"] for e in entities], [float(e["score"]) for e in expected], atol=1e-5)
        for entity in entities:  # [start, end) is the word in the text (lowercased by the uncased tokenizer)
            span = text[entity["start"]:entity["end"]]
            assert entity["word"].removeprefix("##").replace(" ", "") == span.lower().replace(" ", ""), (entity, text)
        found += len(entities)
    assert found >= 5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_reranker_scores_text_pairs_as_cross_encoder_predict(served: RunningServer, sources: dict[str, Path],
                                                               protocol: str):
    from sentence_transformers import CrossEncoder

    got = infer(served, protocol, "reranker", {"text": [q for q, _ in PAIRS], "text_pair": [d for _, d in PAIRS]})
    assert list(got) == ["score"] and got["score"].shape == (len(PAIRS), 1)
    want = CrossEncoder(str(sources["cross_encoder"]), device="cpu").predict(PAIRS)
    np.testing.assert_allclose(got["score"][:, 0], want, atol=1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_dimensions_keep_the_first_ones_of_the_pooled_embedding_at_unit_length(served: RunningServer,
                                                                               engines: dict[str, Path], protocol: str):
    engine = optimize.load(engines["embedder"])
    assert engine.pipeline is not None
    full = engine.run(engine.pipeline.tokenize(SENTENCES))["sentence_embedding"]
    got = infer(served, protocol, "minilm", {"text": SENTENCES})
    assert list(got) == ["sentence_embedding"]
    np.testing.assert_allclose(got["sentence_embedding"], full, atol=1e-5)
    short = infer(served, protocol, "minilm", {"text": SENTENCES}, {"dimensions": 64})["sentence_embedding"]
    assert short.shape == (len(SENTENCES), 64)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(short, full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize("model", ["masked", "lm"])
def test_fill_mask_and_causal_lm_text_requests_answer_the_models_logits(served: RunningServer,
                                                                       sources: dict[str, Path], model: str):
    import transformers

    path = sources[MODELS[model]]
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    hf_model = transformers.AutoModelForMaskedLM if model == "masked" else transformers.AutoModelForCausalLM
    reference = hf_model.from_pretrained(str(path)).eval()
    got = infer(served, "grpc", model, {"text": SENTENCES[:2]})
    assert list(got) == ["logits"] and got["logits"].shape[-1] == reference.config.vocab_size
    for row, sentence in enumerate(SENTENCES[:2]):  # each text alone: its tokens are the real ones of its row
        ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = reference(input_ids=ids).logits[0].numpy()
        np.testing.assert_allclose(got["logits"][row, :ids.shape[1]], want, atol=1e-4, rtol=1e-4)


def test_text_interfaces_are_declared_in_model_metadata_and_config(served: RunningServer):
    client = grpcclient.InferenceServerClient(served.url)

    def declared(model: str) -> tuple[list[Any], list[Any]]:
        meta = client.get_model_metadata(model, as_json=True)
        return ([(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]],
                [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]])

    text = ("text", "BYTES", ["-1", "1"])
    assert declared("sentiment") == ([text], [("label", "BYTES", ["-1", "1"]), ("score", "FP32", ["-1", "1"])])
    assert declared("ner") == ([text], [("entities", "BYTES", ["-1", "1"])])
    assert declared("reranker") == ([text, ("text_pair", "BYTES", ["-1", "1"])], [("score", "FP32", ["-1", "1"])])
    config = client.get_model_config("sentiment").config
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("label", 13, [1]), ("score", 11, [1])]
    assert config.parameters["task"].string_value == "text-classification"
    assert json.loads(config.parameters["labels"].string_value) == ["negative", "neutral", "positive"]
    assert config.parameters["text_options"].string_value == "top_k,all_scores"
    minilm = client.get_model_config("minilm").config
    assert [i.name for i in minilm.input] == ["input_ids", "attention_mask"]  # interface "tokens": the engine's own
    assert (minilm.parameters["task"].string_value, minilm.parameters["text_options"].string_value) == (
        "feature-extraction", "dimensions")
    assert "labels" not in minilm.parameters


def test_token_inputs_and_the_engines_own_outputs_keep_working(served: RunningServer, engines: dict[str, Path]):
    client = grpcclient.InferenceServerClient(served.url)
    for kind, model in (("classifier", "sentiment"), ("ner", "ner")):
        engine = optimize.load(engines[kind])
        assert engine.pipeline is not None
        feeds = engine.pipeline.tokenize(SENTENCES[:2])
        want = engine.run(feeds)["logits"]
        np.testing.assert_allclose(client.infer(model, int64_inputs(feeds)).as_numpy("logits"), want, atol=1e-5)
        asked = infer(served, "grpc", model, {"text": SENTENCES[:2]}, outputs=["logits"])  # a text request may ask
        np.testing.assert_allclose(asked["logits"], want, atol=1e-5)
    engine = optimize.load(engines["cross_encoder"])
    assert engine.pipeline is not None and engine.pipeline.pair
    feeds = engine.pipeline.tokenize_pairs([q for q, _ in PAIRS], [d for _, d in PAIRS])
    got = client.infer("reranker", int64_inputs(feeds)).as_numpy("logits")
    np.testing.assert_allclose(got, engine.run(feeds)["logits"], atol=1e-5)


BAD = [
    ("reranker", {"text": ["how to reset a password"]}, None, None,
     "model 'reranker' is a sentence-pair engine: it takes pairs of texts, as the inputs 'text' and 'text_pair' "
     r"\(one of each per pair\); input 'text_pair' is missing"),
    ("reranker", {"text": ["a", "b"], "text_pair": ["c"]}, None, None,
     "input 'text_pair' has 1 texts and input 'text' 2"),
    ("minilm", {"text": ["hello"]}, {"top_k": 2}, None,
     r"model 'minilm': request parameter 'top_k' does not apply to a feature-extraction engine \(its text requests "
     r"take: dimensions\)"),
    ("minilm", {"text": ["hello"]}, {"dimensions": 385}, None,
     "request parameter 'dimensions' must be between 1 and the embedding's width 384, got 385"),
    ("minilm", {"text": ["hello"]}, None, ["label"],
     "unknown output 'label' requested from model 'minilm'; a text request gets sentence_embedding"),
    ("sentiment", {"text": ["hello"]}, {"top_k": 2, "all_scores": True}, None,
     "'top_k' and 'all_scores' exclude each other"),
    ("ner", {"text": ["hello"]}, {"top_k": "3"}, None,
     "request parameter 'top_k' does not apply to a token-classification engine"),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model, texts, parameters, outputs, message", BAD,
                         ids=["one text to a pair model", "unequal pairs", "top_k of an embedder",
                              "dimensions over the width", "labels of an embedder", "top_k with all_scores",
                              "top_k of a token classifier"])
def test_bad_text_requests_are_invalid_argument(served: RunningServer, protocol: str, model: str,
                                                texts: dict[str, list[str]], parameters: dict[str, Any] | None,
                                                outputs: list[str] | None, message: str):
    with pytest.raises(InferenceServerException, match=message) as info:
        infer(served, protocol, model, texts, parameters, outputs)
    assert info.value.status() == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")


def test_a_text_option_on_a_request_of_token_ids_is_invalid_argument(served: RunningServer, engines: dict[str, Path]):
    engine = optimize.load(engines["classifier"])
    assert engine.pipeline is not None
    client = grpcclient.InferenceServerClient(served.url)
    with pytest.raises(InferenceServerException, match="'top_k' applies to text requests; a request of token ids "
                                                       "gets the engine's outputs as they are") as info:
        client.infer("sentiment", int64_inputs(engine.pipeline.tokenize(SENTENCES[:1])), parameters={"top_k": 2})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_only_feature_extraction_engines_are_embedding_models(served: RunningServer):
    listed = fetch(base_url(served) + "/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["minilm"]
    reply = fetch(base_url(served) + "/v1/embeddings", {"model": "sentiment", "input": "hello"})
    error = openai_error(reply, 400)
    assert "text-classification engine, not an embedding model" in error["message"]


DOCUMENTS = ["Click 'Forgot password' on the sign-in page.", "A man is playing a guitar.",
             "The Eiffel Tower is in Paris, France.", "Passwords can be reset from the account settings."]


def test_rerank_answers_documents_by_cross_encoder_score_best_first(served: RunningServer, sources: dict[str, Path]):
    from sentence_transformers import CrossEncoder

    query = "How do I reset my password?"
    want = CrossEncoder(str(sources["cross_encoder"]), device="cpu").predict([(query, d) for d in DOCUMENTS])
    body = {"model": "reranker", "query": query, "documents": DOCUMENTS}
    reply = httpx.post(base_url(served) + "/v1/rerank", json=body, timeout=TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["model"] == "reranker" and answer["usage"]["total_tokens"] > len(DOCUMENTS) * 4
    results = answer["results"]
    assert [r["index"] for r in results] == np.argsort(-want, kind="stable").tolist()
    np.testing.assert_allclose([r["relevance_score"] for r in results], np.sort(want)[::-1], atol=1e-5)
    assert all("document" not in r for r in results)
    top = httpx.post(base_url(served) + "/v1/rerank", json={**body, "top_n": 2, "return_documents": True},
                     timeout=TIMEOUT_S).json()["results"]
    assert [(r["index"], r["document"]["text"]) for r in top] == [
        (r["index"], DOCUMENTS[r["index"]]) for r in results[:2]]


def test_classify_answers_every_label_best_first_as_transformers_pipeline(served: RunningServer,
                                                                          sources: dict[str, Path]):
    want = hf("text-classification", sources["classifier"])(SENTENCES, top_k=None)
    reply = httpx.post(base_url(served) + "/v1/classify", json={"model": "sentiment", "input": SENTENCES},
                       timeout=TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [[d["label"] for d in row] for row in data] == [[d["label"] for d in row] for row in want]
    np.testing.assert_allclose([[d["score"] for d in row] for row in data],
                               [[d["score"] for d in row] for row in want], atol=1e-5)
    raw = httpx.post(base_url(served) + "/v1/classify", json={"model": "sentiment", "input": SENTENCES[0],
                                                              "raw_scores": True}, timeout=TIMEOUT_S).json()["data"]
    assert [d["label"] for d in raw[0]] == [d["label"] for d in want[0]]  # logits rank the labels as the softmax


@pytest.mark.parametrize("route, body, status, words", [
    ("/v1/rerank", {"model": "sentiment", "query": "q", "documents": ["d"]}, 400,
     "model 'sentiment' is a text-classification engine; /v1/rerank serves sentence-pair engines"),
    ("/v1/classify", {"model": "reranker", "input": ["x"]}, 400,
     "model 'reranker' is a sentence-pair engine; /v1/classify serves text-classification engines"),
    ("/v1/classify", {"model": "minilm", "input": ["x"]}, 400, "feature-extraction engine"),
    ("/v1/rerank", {"model": "nope", "query": "q", "documents": ["d"]}, 404, "nope"),
    ("/v1/rerank", {"model": "reranker", "query": "q", "documents": []}, 422, "'documents'"),
    ("/v1/rerank", {"model": "reranker", "query": "q", "documents": ["d"], "top_n": 0}, 422, "'top_n'"),
    ("/v1/classify", {"model": "sentiment", "input": ["x"], "top_k": 2}, 422, "top_k"),
    ("/v1/classify", {"model": "sentiment", "input": ["word " * 40]}, 413, "more than 32 tokens"),
])
def test_rerank_and_classify_refuse_bad_requests_with_the_status_a_client_expects(
        served: RunningServer, route: str, body: dict[str, Any], status: int, words: str):
    reply = httpx.post(base_url(served) + route, json=body, timeout=TIMEOUT_S)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_a_task_without_a_text_interface_serves_its_tokens_and_refuses_texts(engines: dict[str, Path]):
    engine = optimize.load(engines["classifier"])
    assert engine.pipeline is not None
    engine.pipeline.task = "summarization"  # a task this server has no text interface for
    with pytest.raises(ConfigError, match="interface = \"text\" but task 'summarization' has no text interface"):
        Model("future", 1, engine, ModelConfig(interface="text"))
    model = Model("future", 1, engine, ModelConfig())
    with running_server(Repository(models={"future": model})) as running:
        client = running.client()
        assert [i.name for i in client.get_model_metadata("future").inputs] == ["input_ids", "attention_mask"]
        with pytest.raises(InferenceServerException, match="model 'future' takes no text: task 'summarization' has "
                                                           "no text interface in this version of kiln") as info:
            infer(running, "grpc", "future", {"text": ["hello"]})
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        feeds = engine.pipeline.tokenize(SENTENCES[:1])
        np.testing.assert_allclose(client.infer("future", int64_inputs(feeds)).as_numpy("logits"),
                                   engine.run(feeds)["logits"], atol=1e-5)
