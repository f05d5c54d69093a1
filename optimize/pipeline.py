"""`Pipeline`: text pre/post-processing that travels with an engine.

Stored in the engine directory (`pipeline/tokenizer.json` + the manifest's `pipeline` entry),
so anything holding an engine can turn sentences into the engine's input tensors without
knowing the model. Tokenization uses Hugging Face `tokenizers` (Rust, batched).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PIPELINE_DIR = "pipeline"


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
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        self._tokenizer.enable_truncation(max_length=self.max_length)
        self._tokenizer.enable_padding(pad_id=self.pad_id)

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Token ids and attention mask ([len(texts), longest] int64), truncated to `max_length`."""
        if not texts:
            raise ValueError("tokenize needs at least one text")
        return self._feeds(self._tokenizer.encode_batch(list(texts)))

    def tokenize_pairs(self, firsts: list[str], seconds: list[str]) -> dict[str, np.ndarray]:
        """Token ids, attention mask and (where the model has them) token types of text pairs,
        encoded as the model was trained on them (`[CLS] a [SEP] b [SEP]` for BERT)."""
        if not firsts or len(firsts) != len(seconds):
            raise ValueError(f"tokenize_pairs needs as many second texts as first texts; got {len(firsts)} and {len(seconds)}")
        return self._feeds(self._tokenizer.encode_batch(list(zip(firsts, seconds))))

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
        `engine_dir/directory` (a source directory holds them at its top: directory "")."""
        return cls(
            tokenizer_path=Path(engine_dir) / directory / entry["tokenizer"],
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
