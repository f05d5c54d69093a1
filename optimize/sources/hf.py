"""Source: a Hugging Face model directory (config.json + safetensors weights).

Loaded offline with the transformers class of its task (`optimize.sources.tasks`): the head the
directory's `architectures` names, or the task `--task` names. Inputs are `input_ids` and
`attention_mask` ([batch, seq] int64), plus `token_type_ids` for sentence pairs on models that
have token types. Outputs: `last_hidden_state` and, when the directory declares a pooling
(sentence-transformers `modules.json`), `sentence_embedding` for feature extraction (pooling and
normalization folded into the graph so clients get the embedding the model card promises);
`logits` for every head. A `tokenizer.json` becomes the engine's text pipeline, which records
the task, its labels and the function that turns logits into scores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import ConfigError, SourceError
from optimize.runtime.pooling import pool
from optimize.runtime.specs import TensorSpec
from optimize.sources.base import Source, digest_files
from optimize.sources.tasks import Task, classifier_activation, detect_task, labels_of

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


# sentence-transformers Pooling flags -> kiln's pooling names
POOLING_MODES = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max", "lasttoken": "last"}


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
            modes = [k for k in POOLING_MODES if pooling.get(f"pooling_mode_{k}")]
            if len(modes) != 1:
                raise SourceError(f"{path}: pooling {modes or 'none'} is not supported; "
                                  "expected exactly one of cls/mean/max/lasttoken")
            info["pooling"] = POOLING_MODES[modes[0]]
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        info["max_seq_length"] = json.loads(st_config.read_text()).get("max_seq_length")
    return info


class SentenceEncoder(torch.nn.Module):
    """Feature extraction: a transformers base model with named outputs and, optionally,
    sentence-transformers pooling."""

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


class HeadModel(torch.nn.Module):
    """A transformers model with a task head: `logits` in fp32, whatever the compute dtype."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return {"logits": self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float()}


def load_hf_directory(path: Path, config: CompileConfig) -> Source:
    """Load a Hugging Face model directory as a `Source` for its task (`config.task`, else the
    one the directory describes); raises `SourceError` / `ConfigError` with one line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # why: transformers takes ~2 s to import (measured): only Hugging Face sources need it
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.glob("*.bin")]
        hint = f" (found {', '.join(pickled)}: pickle weights are never loaded; convert them to safetensors)" if pickled else ""
        raise SourceError(f"{path}: no *.safetensors weights{hint}")
    raw_config = json.loads((path / "config.json").read_text())
    architecture = (raw_config.get("architectures") or [""])[0]
    st = read_sentence_transformers(path)
    task = detect_task(architecture, raw_config, config.task)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        auto_class = getattr(transformers, task.auto_class)
        model, loading = auto_class.from_pretrained(
            str(path), config=hf_config, local_files_only=True, use_safetensors=True, dtype=torch.float32,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"{path}: cannot load with transformers: {str(exc).splitlines()[0]}") from None
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    missing = [k for k in loading.get("missing_keys", []) if not _derivable(k, tied)]
    if missing:  # transformers would fill them with random numbers: an engine answering noise
        raise SourceError(f"{path}: {architecture or type(model).__name__} has no weights for "
                          f"{', '.join(sorted(missing)[:3])}{' ...' if len(missing) > 3 else ''} "
                          f"needed by task {task.name}")
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False

    max_positions = _max_positions(hf_config, model)
    if max_positions is not None and config.max_seq > max_positions:
        raise ConfigError(f"max_seq {config.max_seq} exceeds the model's {max_positions} positions "
                          f"({hf_config.model_type}, {type(model).__name__})")
    vocab = int(hf_config.vocab_size)
    pad_id = getattr(hf_config, "pad_token_id", None) or 0
    type_vocab = int(getattr(hf_config, "type_vocab_size", 0) or 0)
    token_types = task.name == "sentence-pair" and type_vocab > 1

    if task.name == "feature-extraction":
        module: torch.nn.Module = SentenceEncoder(model, st.get("pooling"), bool(st.get("normalize")))
    else:
        module = HeadModel(model)
    dims = config.dims
    token_shape = (dims["batch"], dims["seq"])
    inputs = [
        TensorSpec("input_ids", "int64", token_shape, value_range=(0, vocab - 1), description="token ids"),
        TensorSpec("attention_mask", "int64", token_shape, value_range=(0, 1), description="1 = token, 0 = padding"),
    ]
    if token_types:
        inputs.append(TensorSpec("token_type_ids", "int64", token_shape, value_range=(0, 1),
                                 description="0 = first text of the pair, 1 = second"))

    def make_inputs(sizes: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Padded batches as a tokenizer makes them: row 0 full length, others random lengths
        (right padding with the pad id), no pad id among the real tokens; for pairs, the second
        text starts at a random point of each row."""
        batch, seq = sizes["batch"], sizes["seq"]
        # a tokenizer never puts the pad token inside a text, and RoBERTa-style models number
        # their positions by counting non-pad ids: real tokens are drawn from the other ids
        ids = torch.randint(0, max(vocab - 1, 1), (batch, seq), generator=generator)
        ids = ids + (ids >= pad_id).long() if vocab > 1 else ids
        lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
        lengths[0] = seq
        positions = torch.arange(seq).unsqueeze(0)
        mask = (positions < lengths.unsqueeze(1)).long()
        ids = ids.masked_fill(mask == 0, pad_id)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if token_types:
            split = (torch.rand(batch, generator=generator) * lengths).long().unsqueeze(1)
            feeds["token_type_ids"] = ((positions >= split) & (mask == 1)).long()
        return feeds

    labels = labels_of(raw_config) if task.name in ("text-classification", "token-classification", "sentence-pair") else []
    pipeline = None
    if (path / "tokenizer.json").is_file():
        max_length = min(config.max_seq, st.get("max_seq_length") or config.max_seq)
        pipeline = {
            "tokenizer": "tokenizer.json",
            "max_length": int(max_length),
            "pad_id": int(pad_id),
            "task": task.name,
            "output": _pipeline_output(task, st),
            "pooling": st.get("pooling"),
            "normalize": bool(st.get("normalize")),
            "labels": labels,
            "activation": classifier_activation(raw_config, task) if labels else None,
            "pair": task.name == "sentence-pair",
            "token_types": token_types,
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
            "task": task.name,
            "labels": labels,
            "pooling": st.get("pooling"),
            "normalize": bool(st.get("normalize")),
        },
        pipeline=pipeline,
        pipeline_dir=path if pipeline else None,
    )


def _max_positions(hf_config: Any, model: torch.nn.Module) -> int | None:
    """The longest sequence the model numbers positions for; None when it has no limit
    (relative positions: XLNet says -1). RoBERTa-style models (RoBERTa, XLM-RoBERTa, MPNet)
    start counting after the pad id, so `max_position_embeddings` 514 holds 512 tokens."""
    limit = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding) \
                and module.padding_idx is not None and module.num_embeddings == limit:
            return limit - module.padding_idx - 1
    return limit


def _derivable(key: str, tied: bool) -> bool:
    """Missing weights transformers recreates exactly: buffers such as position ids, and the
    output embeddings when they are tied to the input embeddings."""
    if key.endswith(("position_ids", "token_type_ids", "masked_bias", "attn.bias")):
        return True
    return tied and key.endswith(("lm_head.weight", "decoder.weight", "decoder.bias"))


def _pipeline_output(task: Task, st: dict[str, Any]) -> str:
    """The output a text request is answered with."""
    if task.name == "feature-extraction":
        return "sentence_embedding" if st.get("pooling") else "last_hidden_state"
    return "logits"
