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
    text request (e.g. `sentence_embedding`); pooling/normalization are already in the graph."""

    tokenizer_path: Path
    max_length: int
    pad_id: int
    output: str
    pooling: str | None = None
    normalize: bool = False

    def __post_init__(self) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        self._tokenizer.enable_truncation(max_length=self.max_length)
        self._tokenizer.enable_padding(pad_id=self.pad_id)

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Token ids and attention mask ([len(texts), longest] int64), truncated to `max_length`."""
        if not texts:
            raise ValueError("tokenize needs at least one text")
        encodings = self._tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }

    @classmethod
    def from_manifest(cls, engine_dir: Path, entry: dict[str, Any]) -> Pipeline:
        """The pipeline of the engine in `engine_dir`; raises `EngineError` when its tokenizer
        path leads outside the engine directory."""
        from optimize.manifest import engine_file

        return cls(
            tokenizer_path=engine_file(engine_dir, f"{PIPELINE_DIR}/{entry['tokenizer']}", "pipeline tokenizer"),
            max_length=int(entry["max_length"]),
            pad_id=int(entry.get("pad_id", 0)),
            output=entry["output"],
            pooling=entry.get("pooling"),
            normalize=bool(entry.get("normalize", False)),
        )


def store_pipeline(entry: dict[str, Any], source_dir: Path, engine_dir: Path) -> list[str]:
    """Copy the pipeline's files into `engine_dir/pipeline/`; return their relative paths."""
    target = engine_dir / PIPELINE_DIR
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source_dir / entry["tokenizer"], target / entry["tokenizer"])
    return [f"{PIPELINE_DIR}/{entry['tokenizer']}"]
