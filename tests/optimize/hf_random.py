"""Hugging Face model directories with random weights, built from `transformers` configs (no
download) and saved once per test session, so the HF-directory source loads them like any
checkpoint."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

_ROOT = Path(tempfile.mkdtemp(prefix="kiln-hf-random-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

# Small enough for the 2-core CI machine, same architecture (and op graph) as the full models.
TINY_BERT = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 1000}


@functools.cache
def hf_dir(kind: str, layers: int, **overrides: int) -> Path:
    """`kind` "bert" (BERT-base unless `overrides` say otherwise), "roberta" (RoBERTa-base: its
    positions counted from the ids) or "gpt2" (GPT-2 small) with `layers` layers and seeded
    random weights."""
    import transformers

    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(num_hidden_layers=layers, **overrides)
    elif kind == "roberta":
        config = transformers.RobertaConfig(num_hidden_layers=layers, **overrides)
    elif kind == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, **overrides)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    model = transformers.AutoModel.from_config(config)
    path = _ROOT / f"{kind}-{layers}-{'-'.join(f'{k}{v}' for k, v in sorted(overrides.items()))}"
    model.save_pretrained(path, safe_serialization=True)
    return path
