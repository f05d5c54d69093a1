"""Tiny random-weight sentence-embedding directories, one per model family kiln compiles, built
from each family's transformers config and laid out as sentence-transformers saves them
(safetensors weights, tokenizer.json, modules.json, 1_Pooling/config.json, 2_Normalize).

BERT-vocabulary families (BERT, DistilBERT, ELECTRA, MPNet, ModernBERT, DeBERTa-v2) take the
all-MiniLM-L6-v2 tokenizer shipped with the test model; the others get a small BPE tokenizer
trained here on real English (the sentences kiln calibrates and verifies on, and the docstrings
of a fixed list of standard-library modules), with the special tokens and pad id each family
uses: RoBERTa's byte-level BPE with <s> </s> <pad>=1, XLM-RoBERTa's sentencepiece-style unigram
model (Metaspace) with the same ids, GPT-2's byte-level BPE with <|endoftext|>, and a Qwen2
decoder used as an embedder (last-token pooling over a trailing <|endoftext|>, normalized, as
Qwen3-Embedding). Tokenizers are trained once per session (cached).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optimize.runtime.config import CompileConfig

# Tiny but complete: every family keeps its own embedding, attention and FFN structure; one layer
# (ModernBERT two: a global and a sliding-window one), since export time grows with the graph.
WIDTH = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 1}
BERT_VOCAB = 30522
BERT_SPECIALS = {"pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102}
BPE_VOCAB = 600
# Special tokens of the trained tokenizers, in id order (RoBERTa's layout: <s>=0, <pad>=1, </s>=2).
BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<|endoftext|>"]
ROBERTA_SPECIALS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
ENDOFTEXT = BPE_SPECIALS.index("<|endoftext|>")
CORPUS_MODULES = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "csv", "dataclasses",
                  "datetime", "decimal", "difflib", "email", "fractions", "functools", "gzip", "heapq", "html",
                  "http.client", "inspect", "itertools", "json", "logging", "math", "os", "pathlib", "pickle",
                  "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
                  "textwrap", "threading", "time", "typing", "unittest", "urllib.parse", "uuid", "zipfile")


@dataclass(frozen=True)
class Family:
    """How to build one family: its transformers config class and arguments, the tokenizer it
    takes ("minilm", "roberta", "sentencepiece", "gpt2", "decoder") and its pooling."""

    config_class: str
    config: dict[str, Any]
    tokenizer: str
    pooling: str = "mean"
    normalize: bool = False


FAMILIES: dict[str, Family] = {
    "bert": Family("BertConfig", {**WIDTH, "vocab_size": BERT_VOCAB, "max_position_embeddings": 64}, "minilm"),
    "roberta": Family("RobertaConfig", {**WIDTH, **ROBERTA_SPECIALS, "max_position_embeddings": 66,
                                        "type_vocab_size": 1}, "roberta"),
    "xlm-roberta": Family("XLMRobertaConfig", {**WIDTH, **ROBERTA_SPECIALS, "max_position_embeddings": 66,
                                               "type_vocab_size": 1}, "sentencepiece"),
    "distilbert": Family("DistilBertConfig", {"dim": 32, "n_heads": 2, "hidden_dim": 64, "n_layers": 1,
                                              "vocab_size": BERT_VOCAB, "max_position_embeddings": 64,
                                              "pad_token_id": 0}, "minilm"),
    "electra": Family("ElectraConfig", {**WIDTH, "embedding_size": 16, "vocab_size": BERT_VOCAB,
                                        "max_position_embeddings": 64}, "minilm"),
    "mpnet": Family("MPNetConfig", {**WIDTH, **BERT_SPECIALS, "vocab_size": BERT_VOCAB,
                                    "max_position_embeddings": 64}, "minilm"),
    # local (sliding-window) attention narrower than the engines' sequences, so it is exercised
    "modernbert": Family("ModernBertConfig", {**WIDTH, **BERT_SPECIALS, "num_hidden_layers": 2,
                                              "cls_token_id": 101, "sep_token_id": 102,
                                              "vocab_size": BERT_VOCAB, "max_position_embeddings": 64,
                                              "local_attention": 8, "global_attn_every_n_layers": 2}, "minilm"),
    # DeBERTa-v3's attention: disentangled relative positions (c2p + p2c) in log buckets
    "deberta-v2": Family("DebertaV2Config", {**WIDTH, "vocab_size": BERT_VOCAB, "pad_token_id": 0,
                                             "max_position_embeddings": 64, "relative_attention": True,
                                             "position_buckets": 16, "max_relative_positions": 64,
                                             "pos_att_type": ["p2c", "c2p"], "position_biased_input": False,
                                             "norm_rel_ebd": "layer_norm", "share_att_key": True,
                                             "type_vocab_size": 0}, "minilm"),
    "gpt2": Family("GPT2Config", {"n_embd": 32, "n_head": 2, "n_layer": 1, "n_positions": 64,
                                  "bos_token_id": ENDOFTEXT, "eos_token_id": ENDOFTEXT,
                                  "pad_token_id": ENDOFTEXT}, "gpt2"),
    "qwen2": Family("Qwen2Config", {**WIDTH, "num_key_value_heads": 1, "max_position_embeddings": 64,
                                    "eos_token_id": ENDOFTEXT, "pad_token_id": ENDOFTEXT,
                                    "tie_word_embeddings": True}, "decoder", pooling="lasttoken", normalize=True),
}


def compile_config(backend: str) -> CompileConfig:
    """How every family engine is compiled: real sentences fit in 32 tokens; verify_samples=1
    keeps the range corners and the held-out sentences every text engine is judged on."""
    return CompileConfig(backend=backend, max_batch=4, max_seq=32, verify_samples=1)


def corpus() -> list[str]:
    """Real English sentences (about 1,800 with Python 3.11): kiln's calibration and verification
    sentences and the sentences of the docstrings of `CORPUS_MODULES`."""
    from optimize.samples import CALIBRATION_SENTENCES, VERIFICATION_SENTENCES

    sentences = [*CALIBRATION_SENTENCES, *VERIFICATION_SENTENCES]
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""] + [inspect.getdoc(getattr(module, attr, None)) or ""
                                                 for attr in sorted(getattr(module, "__all__", []))[:20]]
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 4 <= len(sentence.split()) <= 40 and sentence[:1].isupper():
                    sentences.append(sentence)
    return sentences


@functools.cache
def trained_tokenizer(kind: str) -> str:
    """tokenizer.json text of a tokenizer of `kind` trained on `corpus()` (at most `BPE_VOCAB`
    tokens, `BPE_SPECIALS` first): "roberta" (byte-level BPE, <s> A </s>), "sentencepiece"
    (unigram over Metaspace pieces, <s> A </s>), "gpt2" (byte-level BPE, no specials added) or
    "decoder" (byte-level BPE, A <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind == "sentencepiece":  # XLM-RoBERTa's kind: a unigram model over Metaspace pieces
        tokenizer = Tokenizer(models.Unigram())
        # as xlm-roberta-base's tokenizer.json: words split at whitespace, then each gets its "▁"
        # (so a word's offsets leave out the space before it)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
        tokenizer.decoder = decoders.Metaspace()
        trainer: Any = trainers.UnigramTrainer(vocab_size=BPE_VOCAB, special_tokens=BPE_SPECIALS,
                                               unk_token="<unk>", show_progress=False)
    else:
        tokenizer = Tokenizer(models.BPE())
        # as roberta-base's and gpt2's tokenizer.json: no space added before the first word
        # (transformers' RobertaTokenizer rebuilds its pre-tokenizer that way whatever the file says)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=BPE_SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    assert [tokenizer.token_to_id(t) for t in BPE_SPECIALS] == list(range(len(BPE_SPECIALS)))
    if kind == "roberta":
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    elif kind == "sentencepiece":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B:1 </s>:1", special_tokens=[("<s>", 0), ("</s>", 2)])
    elif kind == "decoder":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", ENDOFTEXT)])
    return tokenizer.to_str()


def family_dir(name: str, root: Path, minilm_dir: Path) -> Path:
    """`root/name`: family `name`'s bare model (seeded random weights) as a sentence-transformers
    directory with its tokenizer and pooling."""
    import transformers

    family = FAMILIES[name]
    path = root / name
    config_args = dict(family.config)
    if family.tokenizer != "minilm":
        from tokenizers import Tokenizer

        config_args["vocab_size"] = Tokenizer.from_str(trained_tokenizer(family.tokenizer)).get_vocab_size()
    config = getattr(transformers, family.config_class)(**config_args)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    if family.tokenizer == "minilm":
        shutil.copy(minilm_dir / "tokenizer.json", path / "tokenizer.json")
    else:
        (path / "tokenizer.json").write_text(trained_tokenizer(family.tokenizer))
    write_pooling(path, int(getattr(config, "hidden_size", None) or config.dim), family.pooling, family.normalize)
    return path


def write_pooling(path: Path, width: int, pooling: str, normalize: bool) -> None:
    """sentence-transformers' modules.json and 1_Pooling/config.json (and 2_Normalize)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": width, **{f"pooling_mode_{m}": m == pooling or m == f"{pooling}_tokens"
                                               for m in modes}}))


def pooled(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """sentence-transformers' pooling, written out independently of kiln's: masked mean, or
    the last real token (the last column for left padding, length - 1 for right padding)."""
    if pooling == "mean":
        weights = mask.unsqueeze(-1).float()
        out = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    else:
        left = bool(mask[:, -1].all())
        last = torch.full((hidden.shape[0],), hidden.shape[1] - 1) if left else mask.sum(1) - 1
        out = hidden[torch.arange(hidden.shape[0]), last]
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out
