"""The text pipeline's task interfaces (`optimize/runtime/pipeline.py`): the answers it makes from a
model's outputs equal what transformers' own pipelines and sentence-transformers' CrossEncoder
answer for the same model and real sentences; offsets point back into the texts; options are
checked per task.

Models are the tiny random-weight task models of tests/optimize/task_models.py, run in
transformers itself (the engines' agreement with them is tests/optimize/test_tasks.py's), so
these tests isolate the post-processing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from optimize.runtime.config import CompileConfig
from optimize.runtime.pipeline import Encoded, Pipeline, TextInterface, TextOptions
from optimize.runtime.specs import Dim, TensorSpec
from optimize.sources import load_source

SENTENCES = ["The new movie is awesome, I loved every minute of it!", "The food was cold and the service was terrible.",
             "How do I reset my password?", "A man is playing a guitar.", "Berlin is the capital of Germany."]
NER_SENTENCES = ["My name is Wolfgang and I live in Berlin.",
                 "Angela Merkel visited the Eiffel Tower in Paris last summer.",
                 "Hugging Face Inc. is a company based in New York City.",
                 "Der Bürgermeister von München traf Sánchez in São Paulo 🎸."]  # accents, an [UNK]
PAIRS = [("How do I reset my password?", "Click 'Forgot password' on the sign-in page."),
         ("How do I reset my password?", "A man is playing a guitar."),
         ("Where is the Eiffel Tower?", "The Eiffel Tower is in Paris, France."),
         ("Where is the Eiffel Tower?", "Berlin is the capital of Germany.")]
CONFIG = CompileConfig(backend="onnxruntime", max_batch=8, max_seq=32)
BATCH, SEQ = Dim("batch", 1, 1, 8), Dim("seq", 1, 16, 32)


@pytest.fixture(scope="module")
def dirs(task_source: Any) -> dict[str, Path]:
    return {kind: task_source(kind) for kind in ("classifier", "multilabel", "ner", "cross_encoder")}


def pipeline_of(path: Path) -> Pipeline:
    source = load_source(path, CONFIG)
    assert source.pipeline is not None
    return Pipeline.from_manifest(path, source.pipeline, directory="")


def logits_spec(*dims: int | Dim) -> list[TensorSpec]:
    return [TensorSpec("logits", "float32", (BATCH, *dims))]


def logits_of(path: Path, encoded: Encoded) -> np.ndarray:
    import transformers

    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(str(path)).eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in encoded.feeds.items()}).logits.numpy()


def hf_pipeline(task: str, path: Path, **options: Any) -> Any:
    import transformers

    return transformers.pipeline(task, model=str(path), **options)


def answer(interface: TextInterface, path: Path, encoded: Encoded, names: list[str],
           **options: Any) -> dict[str, np.ndarray]:
    return interface.postprocess({"logits": logits_of(path, encoded)}, encoded, interface.check_options(options),
                                 names)


def as_rows(labels: np.ndarray, scores: np.ndarray) -> list[list[tuple[str, float]]]:
    return [list(zip(row_labels, row_scores.tolist(), strict=True)) for row_labels, row_scores in zip(labels, scores,
                                                                                                      strict=True)]


def assert_same_rankings(got: list[list[tuple[str, float]]], want: list[list[dict[str, Any]]]) -> None:
    assert [[label for label, _ in row] for row in got] == [[d["label"] for d in row] for row in want]
    np.testing.assert_allclose([[s for _, s in row] for row in got], [[d["score"] for d in row] for row in want],
                               atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 0])
def test_labels_and_scores_are_transformers_text_classification(dirs, top_k: int):
    pipeline = pipeline_of(dirs["classifier"])
    interface = pipeline.text_interface(logits_spec(3))
    encoded = pipeline.encode(SENTENCES)
    got = answer(interface, dirs["classifier"], encoded, ["label", "score"], top_k=top_k)
    want = hf_pipeline("text-classification", dirs["classifier"])(SENTENCES, top_k=top_k or None)
    assert got["label"].shape == (len(SENTENCES), top_k or 3) and got["score"].dtype == np.float32
    assert_same_rankings(as_rows(got["label"], got["score"]), want)
    if top_k == 1:  # the pipeline's plain call answers the same best label
        plain = hf_pipeline("text-classification", dirs["classifier"])(SENTENCES)
        assert got["label"][:, 0].tolist() == [d["label"] for d in plain]
    assert len({tuple(row) for row in got["label"].tolist()}) > 1, "the sentences should not all rank alike"


def test_all_scores_are_every_label_in_label_order(dirs):
    pipeline = pipeline_of(dirs["classifier"])
    interface = pipeline.text_interface(logits_spec(3))
    encoded = pipeline.encode(SENTENCES)
    got = answer(interface, dirs["classifier"], encoded, ["label", "score"], all_scores=True)
    assert got["label"].tolist() == [["negative", "neutral", "positive"]] * len(SENTENCES)
    want = hf_pipeline("text-classification", dirs["classifier"])(SENTENCES, top_k=None)
    by_label = [{d["label"]: d["score"] for d in row} for row in want]
    np.testing.assert_allclose(got["score"], [[row[label] for label in interface.labels] for row in by_label],
                               atol=1e-6)


def test_a_multi_label_classifier_scores_each_label_with_a_sigmoid(dirs):
    pipeline = pipeline_of(dirs["multilabel"])
    interface = pipeline.text_interface(logits_spec(4))
    encoded = pipeline.encode(SENTENCES)
    got = answer(interface, dirs["multilabel"], encoded, ["label", "score"], top_k=0)
    assert_same_rankings(as_rows(got["label"], got["score"]),
                         hf_pipeline("text-classification", dirs["multilabel"])(SENTENCES, top_k=None))
    assert (got["score"].sum(axis=1) > 1.01).any(), "sigmoid scores are independent, they need not sum to 1"


def test_entities_are_transformers_simple_aggregation_with_offsets_into_the_text(dirs):
    pipeline = pipeline_of(dirs["ner"])
    interface = pipeline.text_interface(logits_spec(SEQ, 5))
    encoded = pipeline.encode(NER_SENTENCES)
    got = answer(interface, dirs["ner"], encoded, ["entities"])["entities"]
    assert got.shape == (len(NER_SENTENCES), 1)
    want = hf_pipeline("token-classification", dirs["ner"], aggregation_strategy="simple")(NER_SENTENCES)
    for text, row, expected in zip(NER_SENTENCES, got[:, 0], want, strict=True):
        entities = json.loads(row)
        assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in entities] == [
            (e["entity_group"], e["word"], e["start"], e["end"]) for e in expected]
        np.testing.assert_allclose([e["score"] for e in entities], [float(e["score"]) for e in expected], atol=1e-6)
        for entity in entities:  # the word is the text it spans, as the uncased tokenizer writes it
            assert same_words(entity["word"], text[entity["start"]:entity["end"]]), (entity, text)
    groups = [e["entity_group"] for row in got[:, 0] for e in json.loads(row)]
    assert {"PER", "LOC"} <= set(groups), "the model should find entities of both kinds"
    assert any(" " in e["word"] for row in got[:, 0] for e in json.loads(row)), "and some over several words"


@pytest.mark.parametrize("kind", ["ner_roberta", "ner_xlmr"])
def test_entities_from_bpe_and_unigram_tokenizers_are_transformers_simple_aggregation(kind: str, task_source):
    # byte-level BPE marks a word's start with "Ġ" inside the token, a unigram model with "▁":
    # words and offsets come out of the tokenizer's decoder and offsets, not WordPiece's "##"
    path = task_source(kind)
    source = load_source(path, CompileConfig(max_batch=8, max_seq=64))  # the tiny vocabularies take many tokens
    assert source.pipeline is not None
    pipeline = Pipeline.from_manifest(path, source.pipeline, directory="")
    interface = pipeline.text_interface(logits_spec(SEQ, 5))
    texts = NER_SENTENCES[:3]
    encoded = pipeline.encode(texts)
    assert encoded.feeds["attention_mask"].sum(axis=1).max() < 64, "nothing truncated: transformers truncates nothing"
    got = answer(interface, path, encoded, ["entities"])["entities"]
    want = hf_pipeline("token-classification", path, aggregation_strategy="simple")(texts)
    found = 0
    for text, row, expected in zip(texts, got[:, 0], want, strict=True):
        entities = json.loads(row)
        assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in entities] == [
            (e["entity_group"], e["word"], e["start"], e["end"]) for e in expected]
        np.testing.assert_allclose([e["score"] for e in entities], [float(e["score"]) for e in expected], atol=1e-6)
        for entity in entities:  # cased tokenizers: the word is in the text it spans (a lone "▁" is no text)
            assert entity["word"].strip() in text[entity["start"]:entity["end"]], (entity, text)
        found += len(entities)
    assert found >= 5


def same_words(word: str, span: str) -> bool:
    """`word` (decoded word pieces of an uncased tokenizer) is `span` lowercased, accents
    stripped; a group that starts inside a word starts with `##`."""
    import unicodedata

    plain = "".join(c for c in unicodedata.normalize("NFD", span.lower()) if not unicodedata.combining(c))
    return word.removeprefix("##").replace(" ", "") == plain.replace(" ", "")


def test_offsets_are_the_character_spans_transformers_gives_each_token(dirs, minilm_model_dir: Path):
    import transformers

    pipeline = pipeline_of(dirs["ner"])
    encoded = pipeline.encode(NER_SENTENCES)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(dirs["ner"]))
    for row, text in enumerate(NER_SENTENCES):
        reference = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        length = len(reference["input_ids"])
        assert encoded.offsets[row, :length].tolist() == [list(span) for span in reference["offset_mapping"]]
        assert encoded.special[row, :length].tolist() == [bool(s) for s in reference["special_tokens_mask"]]
        assert encoded.special[row, length:].all(), "padding counts as special"


def test_pair_scores_are_cross_encoder_predict(dirs):
    from sentence_transformers import CrossEncoder

    pipeline = pipeline_of(dirs["cross_encoder"])
    interface = pipeline.text_interface(logits_spec(1))
    assert [t.name for t in interface.inputs] == ["text", "text_pair"]
    encoded = pipeline.encode([q for q, _ in PAIRS], [d for _, d in PAIRS])
    assert encoded.feeds["token_type_ids"].any()
    got = answer(interface, dirs["cross_encoder"], encoded, ["score"])["score"]
    want = CrossEncoder(str(dirs["cross_encoder"]), device="cpu").predict(PAIRS)
    assert got.shape == (len(PAIRS), 1)
    np.testing.assert_allclose(got[:, 0], want, atol=1e-6)
    assert np.ptp(got) > 0.01, "the pairs should score differently"


def test_each_task_declares_its_text_inputs_outputs_and_options(dirs, minilm_model_dir: Path):
    def declared(interface: TextInterface) -> tuple[Any, ...]:
        return ([t.name for t in interface.inputs], [(t.name, t.dtype, t.shape) for t in interface.outputs],
                interface.options)

    assert declared(pipeline_of(dirs["classifier"]).text_interface(logits_spec(3))) == (
        ["text"], [("label", "object", (1,)), ("score", "float32", (1,))], ("top_k", "all_scores"))
    assert declared(pipeline_of(dirs["ner"]).text_interface(logits_spec(SEQ, 5))) == (
        ["text"], [("entities", "object", (1,))], ())
    assert declared(pipeline_of(dirs["cross_encoder"]).text_interface(logits_spec(1))) == (
        ["text", "text_pair"], [("score", "float32", (1,))], ())
    embedder = pipeline_of(minilm_model_dir)
    outputs = [TensorSpec("last_hidden_state", "float32", (BATCH, SEQ, 384)),
               TensorSpec("sentence_embedding", "float32", (BATCH, 384))]
    assert declared(embedder.text_interface(outputs)) == (
        ["text"], [("sentence_embedding", "float32", (384,))], ("dimensions",))
    assert pipeline_of(dirs["classifier"]).text_interface(logits_spec(3)).labels == ("negative", "neutral", "positive")
    assert embedder.text_interface(outputs).labels == ()


def test_options_are_checked_per_task_and_refused_for_token_requests(dirs, minilm_model_dir: Path):
    classifier = pipeline_of(dirs["classifier"]).text_interface(logits_spec(3))
    embedder = pipeline_of(minilm_model_dir).text_interface([TensorSpec("sentence_embedding", "float32", (BATCH, 384))])
    assert classifier.check_options({"top_k": 2, "priority": 1, "truncate": True}) == TextOptions(top_k=2)
    assert embedder.check_options({"dimensions": 64}) == TextOptions(dimensions=64)
    refusals = [
        (embedder, {"top_k": 1}, "request parameter 'top_k' does not apply to a feature-extraction engine "
                                 r"\(its text requests take: dimensions\)"),
        (classifier, {"dimensions": 8}, "'dimensions' does not apply to a text-classification engine"),
        (embedder, {"dimensions": 385}, "'dimensions' must be between 1 and the embedding's width 384, got 385"),
        (embedder, {"dimensions": 0}, "'dimensions' must be between 1"),
        (classifier, {"top_k": -1}, "'top_k' must be >= 0"),
        (classifier, {"top_k": True}, "'top_k' must be an integer, got True"),
        (classifier, {"all_scores": 1}, "'all_scores' must be a boolean, got 1"),
        (classifier, {"top_k": 2, "all_scores": True}, "'top_k' and 'all_scores' exclude each other"),
    ]
    for interface, values, message in refusals:
        with pytest.raises(ValueError, match=message):
            interface.check_options(values)
    with pytest.raises(ValueError, match="'top_k' applies to text requests; a request of token ids gets the "
                                         "engine's outputs as they are"):
        classifier.check_options({"top_k": 2}, text=False)
    assert classifier.check_options({}, text=False) == TextOptions()


def test_a_task_without_a_text_interface_is_refused_by_name(dirs):
    pipeline = pipeline_of(dirs["classifier"])
    pipeline.task = "summarization"
    with pytest.raises(ValueError, match="task 'summarization' has no text interface in this version of kiln"):
        pipeline.text_interface(logits_spec(3))
