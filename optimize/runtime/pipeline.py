"""`Pipeline`: text pre/post-processing that travels with an engine.

Stored in the engine directory (`pipeline/tokenizer.json` + the manifest's `pipeline` entry),
so anything holding an engine can turn sentences into the engine's input tensors without
knowing the model, and the engine's outputs into the task's answer. Tokenization uses Hugging
Face `tokenizers` (Rust, batched); post-processing is numpy (`optimize.runtime.postprocess`).

`Pipeline.text_interface` describes what a text request to the engine sends and gets back,
per task (server/README.md, "Tasks", documents it for clients):

| task | inputs | outputs (per text) | options |
| --- | --- | --- | --- |
| text-classification | `text` | `label` (str) and `score` [k], best first | `top_k` (1; 0: all), `all_scores` |
| token-classification | `text` | `entities`: one JSON array of entities | — |
| sentence-pair | `text`, `text_pair` | `score` [labels] | — |
| feature-extraction | `text` | the pooled `sentence_embedding` | `dimensions` |
| fill-mask, causal-lm | `text` | `logits` | — |

Entities are ragged (any number per text), so each text's are one JSON string,
as transformers' list of dicts: a [n, 1] tensor keeps the batch dim every other output has,
where flat per-entity tensors would need a row index and padded ones a fill value.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from optimize.runtime import postprocess
from optimize.runtime.manifest import PIPELINE_DIR, engine_file
from optimize.runtime.specs import Dim, TensorSpec

TEXT, TEXT_PAIR = "text", "text_pair"
# The options a text request may send as request parameters, with their type; which ones a task
# takes is `_TASK_OPTIONS`'.
OPTIONS: dict[str, type] = {"top_k": int, "all_scores": bool, "dimensions": int}
_TASK_OPTIONS = {"text-classification": ("top_k", "all_scores"), "feature-extraction": ("dimensions",)}
_PASSED_THROUGH = ("fill-mask", "causal-lm")  # text requests get the engine's logits as they are
_LABELLED = ("text-classification", "token-classification", "sentence-pair")


@dataclass(frozen=True)
class Encoded:
    """Texts tokenized for an engine: `feeds` are its inputs ([n, longest] int64); `offsets`
    ([n, longest, 2] int64) the character span of each token in its text (in `pairs` for the
    second text's tokens), `special` ([n, longest] bool) marks special tokens and padding;
    `truncated` lists the texts (by index) that held more than `max_length` tokens and were cut."""

    feeds: dict[str, np.ndarray]
    texts: tuple[str, ...]
    pairs: tuple[str, ...] | None
    offsets: np.ndarray
    special: np.ndarray
    truncated: tuple[int, ...] = ()


@dataclass(frozen=True)
class TextTensor:
    """One input or output of a text interface: `dtype` is a numpy dtype name ("object": UTF-8
    text, KServe's BYTES), `shape` the shape per text, without the batch dim (-1: varies)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    description: str = ""


@dataclass(frozen=True)
class TextOptions:
    """What a text request asks of the post-processing: `top_k` labels (0: all), or
    `all_scores` (every label, in label order); `dimensions` of the embedding to keep (None:
    all)."""

    top_k: int = 1
    all_scores: bool = False
    dimensions: int | None = None


class TextInterface:
    """What a text request to an engine sends (`inputs`), may ask for (`options`, by name) and
    gets back by default (`outputs`); `check_options` validates a request's options and
    `postprocess` turns the engine's outputs into the answer. Made by `Pipeline.text_interface`
    for the engine's outputs."""

    def __init__(self, pipeline: Pipeline, engine_outputs: Sequence[TensorSpec]) -> None:
        self.pipeline = pipeline
        self.task = pipeline.task
        self._engine = {spec.name: spec for spec in engine_outputs}
        text = TextTensor(TEXT, "object", (1,), "one UTF-8 text")
        self.inputs: tuple[TextTensor, ...] = (text,)
        self.options: tuple[str, ...] = _TASK_OPTIONS.get(self.task, ())
        task = self.task
        if task == "text-classification":
            self.outputs: tuple[TextTensor, ...] = (
                TextTensor("label", "object", (1,), "the top_k labels, best first (all_scores: every label in id order)"),
                TextTensor("score", "float32", (1,), "the score of each label, as transformers' pipeline gives it"))
        elif task == "token-classification":
            self.outputs = (TextTensor("entities", "object", (1,), "a JSON array of {entity_group, score, word, "
                                                                   "start, end}; start/end are character offsets"),)
        elif task == "sentence-pair":
            self.inputs = (TextTensor(TEXT, "object", (1,), "the first text of each pair (the query)"),
                           TextTensor(TEXT_PAIR, "object", (1,), "the second text of each pair (the document)"))
            self.outputs = (TextTensor("score", "float32", (self._label_count(),),
                                       "one score per label, as sentence-transformers' CrossEncoder gives it"),)
        elif task == "feature-extraction" or task in _PASSED_THROUGH:
            spec = self._engine.get(pipeline.output)
            if spec is None:
                raise ValueError(f"the pipeline's output {pipeline.output!r} is not an output of the engine")
            if pipeline.output != "sentence_embedding":
                self.options = ()  # only a pooled embedding is truncated
            shape = tuple(-1 if isinstance(d, Dim) else d for d in spec.shape[1:])
            self.outputs = (TextTensor(spec.name, spec.dtype, shape, spec.description),)
        else:
            raise ValueError(f"task {task!r} has no text interface in this version of kiln; send the engine's inputs")

    def _label_count(self) -> int:
        logits = self._engine.get("logits")
        width = logits.shape[-1] if logits is not None else None
        return width if isinstance(width, int) else len(self.pipeline.labels) or 1

    @property
    def labels(self) -> tuple[str, ...]:
        """Label names in id order (`LABEL_i` where the engine names none); () for a task
        without labels."""
        if self.task not in _LABELLED:
            return ()
        return self.pipeline.labels or tuple(f"LABEL_{i}" for i in range(self._label_count()))

    def check_options(self, values: Mapping[str, Any], text: bool = True) -> TextOptions:
        """The options among a request's parameters `values` (name → value; others are not
        looked at), checked for this task: a request of token ids (`text` False) takes none.
        Raises `ValueError` naming the option and what is wrong."""
        given = {name: values[name] for name in OPTIONS if name in values}
        for name, value in given.items():
            if not text:
                raise ValueError(f"request parameter '{name}' applies to text requests; a request of token ids "
                                 "gets the engine's outputs as they are")
            if name not in self.options:
                takes = ", ".join(self.options) or "none"
                raise ValueError(f"request parameter '{name}' does not apply to a {self.task} engine "
                                 f"(its text requests take: {takes})")
            kind = OPTIONS[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"request parameter '{name}' must be {'a boolean' if kind is bool else 'an integer'}, "
                                 f"got {value!r}")
        options = TextOptions(**given)
        if options.top_k < 0:
            raise ValueError(f"request parameter 'top_k' must be >= 0 (0: every label), got {options.top_k}")
        if options.all_scores and "top_k" in given:
            raise ValueError("request parameters 'top_k' and 'all_scores' exclude each other: all_scores answers "
                             "every label in label order, top_k the best k, best first")
        if options.dimensions is not None:
            width = self.outputs[0].shape[-1]
            if options.dimensions < 1 or (width > 0 and options.dimensions > width):
                raise ValueError(f"request parameter 'dimensions' must be between 1 and the embedding's width "
                                 f"{width}, got {options.dimensions}")
        return options

    def postprocess(self, outputs: Mapping[str, np.ndarray], encoded: Encoded, options: TextOptions,
                    names: Sequence[str]) -> dict[str, np.ndarray]:
        """The answer to a text request: for each of `names`, an output of this interface
        computed from the engine's `outputs` for `encoded` (the request's own rows, token axes
        cut to its longest text), or an engine output as it is."""
        answer: dict[str, np.ndarray] = {}
        task, pipeline = self.task, self.pipeline
        if task == "text-classification" and {"label", "score"} & set(names):
            scores = postprocess.activate(outputs["logits"], pipeline.activation or self._default_activation())
            answer["label"], answer["score"] = postprocess.top_labels(scores, self.labels, options.top_k,
                                                                      options.all_scores)
        elif task == "sentence-pair" and "score" in names:
            answer["score"] = postprocess.activate(outputs["logits"], pipeline.activation or self._default_activation())
        elif task == "token-classification" and "entities" in names:
            answer["entities"] = self._entities(outputs["logits"], encoded)
        elif options.dimensions is not None and pipeline.output in names:
            answer[pipeline.output] = postprocess.truncate_embeddings(outputs[pipeline.output], options.dimensions)
        return {name: answer[name] if name in answer else outputs[name] for name in names}

    def _default_activation(self) -> str:
        return "softmax" if self._label_count() > 1 else "sigmoid"

    def _entities(self, logits: np.ndarray, encoded: Encoded) -> np.ndarray:
        """One JSON array of entities per text ([n, 1] object array of str)."""
        pipeline = self.pipeline
        keep = ~encoded.special & (encoded.feeds["attention_mask"] == 1)
        ids = encoded.feeds["input_ids"]
        scores = postprocess.activate(logits, "softmax")  # transformers' NER pipeline always takes the softmax
        answer = np.empty((len(encoded.texts), 1), dtype=object)
        for row, text in enumerate(encoded.texts):
            entities = postprocess.group_entities(scores[row], keep[row], ids[row], encoded.offsets[row], text,
                                                  self.labels, pipeline.token_of, pipeline.decode, pipeline.unk_id)
            answer[row, 0] = json.dumps(entities, ensure_ascii=False)
        return answer


@dataclass
class Pipeline:
    """Tokenizer and output choice of a text engine. `output` names the tensor that answers a
    text request (e.g. `sentence_embedding`); pooling/normalization are already in the graph.
    `task` is what the engine computes (optimize.sources.tasks); classifiers carry their
    `labels` in id order and the `activation` ("softmax", "sigmoid", "none") that turns logits
    into scores. A `pair` engine scores two texts at once (`tokenize_pairs`); `token_types`
    says whether it takes `token_type_ids`."""

    tokenizer_path: Path
    max_length: int
    pad_id: int
    output: str
    pooling: str | None = None
    normalize: bool = False
    task: str = "feature-extraction"
    labels: tuple[str, ...] = ()
    activation: str | None = None
    pair: bool = False
    token_types: bool = False

    def __post_init__(self) -> None:
        self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        self._tokenizer.enable_truncation(max_length=self.max_length)
        self._tokenizer.enable_padding(pad_id=self.pad_id)
        unk = getattr(self._tokenizer.model, "unk_token", None)
        self.unk_id: int | None = self._tokenizer.token_to_id(unk) if unk else None

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Token ids and attention mask ([len(texts), longest] int64), truncated to `max_length`."""
        if not texts:
            raise ValueError("tokenize needs at least one text")
        return self._feeds(self._tokenizer.encode_batch(list(texts)))

    def tokenize_pairs(self, firsts: list[str], seconds: list[str]) -> dict[str, np.ndarray]:
        """Token ids, attention mask and (where the model has them) token types of text pairs,
        encoded as the model was trained on them (`[CLS] a [SEP] b [SEP]` for BERT)."""
        self._check_pairs(firsts, seconds)
        return self._feeds(self._tokenizer.encode_batch(list(zip(firsts, seconds))))

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> Encoded:
        """`texts` (with their second texts `pairs`, for pair engines) tokenized as `tokenize`
        and `tokenize_pairs` do, with each token's character offsets and which tokens are
        special: what post-processing needs to point back into the texts."""
        texts = tuple(texts)
        if pairs is None:
            if not texts:
                raise ValueError("encode needs at least one text")
            encodings = self._tokenizer.encode_batch(list(texts))
        else:
            pairs = tuple(pairs)
            self._check_pairs(texts, pairs)
            encodings = self._tokenizer.encode_batch(list(zip(texts, pairs)))
        feeds = self._feeds(encodings)
        longest = feeds["input_ids"].shape[1]
        return Encoded(
            feeds=feeds, texts=texts, pairs=pairs,
            offsets=np.array([e.offsets for e in encodings], dtype=np.int64).reshape(len(encodings), longest, 2),
            special=np.array([e.special_tokens_mask for e in encodings], dtype=bool).reshape(len(encodings), longest),
            truncated=tuple(i for i, e in enumerate(encodings) if e.overflowing),
        )

    def text_interface(self, engine_outputs: Sequence[TensorSpec]) -> TextInterface:
        """What a text request to the engine with `engine_outputs` sends and gets (see the
        module's table). Raises `ValueError` for a task with no text interface."""
        return TextInterface(self, engine_outputs)

    def token_of(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` (`##ing` for a WordPiece continuation)."""
        return self._tokenizer.id_to_token(token_id) or ""

    def decode(self, tokens: list[str]) -> str:
        """Tokens turned back into text by the tokenizer's decoder (word pieces joined),
        as transformers' `convert_tokens_to_string`."""
        decoder = self._tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    # One function for every caller that truncates embeddings (text requests' `dimensions`,
    # OpenAI's embeddings API).
    truncate_embeddings = staticmethod(postprocess.truncate_embeddings)

    @staticmethod
    def _check_pairs(firsts: Sequence[str], seconds: Sequence[str]) -> None:
        if not firsts or len(firsts) != len(seconds):
            raise ValueError(f"tokenize_pairs needs as many second texts as first texts; got {len(firsts)} and "
                             f"{len(seconds)}")

    def _feeds(self, encodings: list[Any]) -> dict[str, np.ndarray]:
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        if self.token_types:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        return feeds

    @classmethod
    def from_manifest(cls, engine_dir: Path, entry: dict[str, Any], directory: str = PIPELINE_DIR) -> Pipeline:
        """The pipeline a manifest's `pipeline` entry describes; its files lie in
        `engine_dir/directory` (a source directory holds them at its top: directory "").
        Raises `EngineError` when an engine's tokenizer path leads outside `engine_dir`. (A
        source directory is the user's own and may link elsewhere, as Hugging Face's cache does.)"""
        if directory:
            tokenizer = engine_file(engine_dir, f"{directory}/{entry['tokenizer']}", "pipeline tokenizer")
        else:
            tokenizer = Path(engine_dir) / entry["tokenizer"]
        return cls(
            tokenizer_path=tokenizer,
            max_length=int(entry["max_length"]),
            pad_id=int(entry.get("pad_id", 0)),
            output=entry["output"],
            pooling=entry.get("pooling"),
            normalize=bool(entry.get("normalize", False)),
            task=entry.get("task", "feature-extraction"),
            labels=tuple(entry.get("labels") or ()),
            activation=entry.get("activation"),
            pair=bool(entry.get("pair", False)),
            token_types=bool(entry.get("token_types", False)),
        )


def store_pipeline(entry: dict[str, Any], source_dir: Path, engine_dir: Path) -> list[str]:
    """Copy the pipeline's files into `engine_dir/pipeline/`; return their relative paths."""
    target = engine_dir / PIPELINE_DIR
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source_dir / entry["tokenizer"], target / entry["tokenizer"])
    return [f"{PIPELINE_DIR}/{entry['tokenizer']}"]
