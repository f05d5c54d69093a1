"""Source: a Hugging Face model directory (config.json + safetensors weights).

Loaded offline with `transformers.AutoModel`. Inputs are `input_ids` and `attention_mask`
([batch, seq] int64); outputs `last_hidden_state`, plus `sentence_embedding` when the directory
is a sentence-transformers model (its Pooling / Normalize modules are folded into the graph so
clients get the embedding the model card promises). A `tokenizer.json` becomes the engine's
text pipeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from optimize.config import CompileConfig
from optimize.errors import ConfigError, SourceError
from optimize.sources.base import Source, digest_files
from optimize.specs import TensorSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_sentence_transformers(path: Path) -> dict[str, Any]:
    """Pooling mode and normalization of a sentence-transformers directory, {} if it is not one."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return {}
    modules = json.loads(modules_file.read_text())
    info: dict[str, Any] = {"normalize": any(m["type"].endswith(".Normalize") for m in modules)}
    for m in modules:
        if m["type"].endswith(".Pooling"):
            pooling = json.loads((path / m["path"] / "config.json").read_text())
            modes = [k for k in ("cls_token", "mean_tokens", "max_tokens") if pooling.get(f"pooling_mode_{k}")]
            if len(modes) != 1:
                raise SourceError(f"{path}: pooling {modes or 'none'} is not supported; expected exactly one of cls/mean/max")
            info["pooling"] = modes[0].split("_")[0]
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        info["max_seq_length"] = json.loads(st_config.read_text()).get("max_seq_length")
    return info


class SentenceEncoder(torch.nn.Module):
    """A transformers model with named outputs and, optionally, sentence-transformers pooling."""

    def __init__(self, model: torch.nn.Module, pooling: str | None, normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = {"last_hidden_state": hidden.float()}
        if self.pooling is None:
            return out
        out["sentence_embedding"] = pool(hidden, attention_mask, self.pooling, self.normalize)
        return out


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """sentence-transformers pooling of [batch, seq, hidden] token states over the real tokens
    (`attention_mask` 1): "mean", "max" or "cls" (the first token); fp32, L2-normalized when
    `normalize`. Engines that cannot compile the pooling into their graph apply it with this."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "mean":
        # clamp: an all-padding row pools to zeros instead of NaN
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    elif pooling == "max":
        pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    else:
        pooled = hidden[:, 0]
    pooled = pooled.float()
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1) if normalize else pooled


def load_hf_directory(path: Path, config: CompileConfig) -> Source:
    """Load a Hugging Face model directory as a `Source`; raises `SourceError` / `ConfigError`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.glob("*.bin")]
        hint = f" (found {', '.join(pickled)}: pickle weights are never loaded; convert them to safetensors)" if pickled else ""
        raise SourceError(f"{path}: no *.safetensors weights{hint}")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModel.from_pretrained(
            str(path), config=hf_config, local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"{path}: cannot load with transformers: {str(exc).splitlines()[0]}") from None
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False

    max_positions = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if max_positions is not None and config.max_seq > max_positions:
        raise ConfigError(f"max_seq {config.max_seq} exceeds the model's {max_positions} positions")
    vocab = int(hf_config.vocab_size)
    pad_id = getattr(hf_config, "pad_token_id", None) or 0

    st = read_sentence_transformers(path)
    module = SentenceEncoder(model, st.get("pooling"), bool(st.get("normalize")))
    dims = config.dims
    token_shape = (dims["batch"], dims["seq"])
    inputs = [
        TensorSpec("input_ids", "int64", token_shape, value_range=(0, vocab - 1), description="token ids"),
        TensorSpec("attention_mask", "int64", token_shape, value_range=(0, 1), description="1 = token, 0 = padding"),
    ]

    def make_inputs(sizes: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Padded batches as a tokenizer makes them: row 0 full length, others random lengths."""
        batch, seq = sizes["batch"], sizes["seq"]
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
        lengths[0] = seq
        mask = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).long()
        ids = ids.masked_fill(mask == 0, pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    pipeline = None
    if (path / "tokenizer.json").is_file():
        max_length = min(config.max_seq, st.get("max_seq_length") or config.max_seq)
        pipeline = {
            "tokenizer": "tokenizer.json",
            "max_length": int(max_length),
            "pad_id": int(pad_id),
            "output": "sentence_embedding" if st.get("pooling") else "last_hidden_state",
            "pooling": st.get("pooling"),
            "normalize": bool(st.get("normalize")),
        }
    files = [p for p in path.iterdir() if p.is_file() and (p.suffix in (".json", ".safetensors", ".txt"))]
    return Source(
        name=path.resolve().name,
        kind="huggingface",
        location=str(path.resolve()),
        digest=digest_files(files),
        module=module,
        inputs=inputs,
        make_inputs=make_inputs,
        metadata={
            "model_type": hf_config.model_type,
            "architecture": type(model).__name__,
            "pooling": st.get("pooling"),
            "normalize": bool(st.get("normalize")),
        },
        pipeline=pipeline,
        pipeline_dir=path if pipeline else None,
    )
