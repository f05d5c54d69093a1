"""Tiny random-weight Hugging Face directories, one per task head, built from transformers
configs with BERT's vocabulary so the all-MiniLM-L6-v2 tokenizer shipped with the test model
tokenizes real sentences for them (GPT-2 gets the same vocabulary size); the multi-label
classifier is a RoBERTa with the byte-level BPE tokenizer of tests/optimize/families.py, as the
classifiers users fine-tune from RoBERTa are, and two token classifiers take RoBERTa's and
XLM-RoBERTa's kinds of tokenizer (byte-level BPE, sentencepiece-style unigram), whose word pieces
and offsets work differently from WordPiece's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

BERT = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2,
        "vocab_size": 30522, "max_position_embeddings": 128}
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
SENTIMENT_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TOPIC_LABELS = {0: "billing", 1: "shipping", 2: "account", 3: "product"}
CROSS_ENCODER = {"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Sigmoid"}}
# Weights spread wider than BERT's initializer_range (0.02), so that sentences get
# answers of their own: with 0.02 every sentence ranks a classifier's labels alike (near-uniform
# scores) and top-k orders go untested; 0.1 gives the token classifier entities of both kinds,
# over several tokens, word pieces and `B-` splits.
SPREAD = {"classifier": 0.2, "multilabel": 0.2, "regression": 0.2, "cross_encoder": 0.2, "ner": 0.1,
          "ner_roberta": 0.1, "ner_xlmr": 0.1}
# kinds whose tokenizer is trained here (tests/optimize/families.py `trained_tokenizer`), not MiniLM's
TRAINED_TOKENIZERS = {"multilabel": "roberta", "ner_roberta": "roberta", "ner_xlmr": "sentencepiece"}


def save(model: torch.nn.Module, path: Path, tokenizer_from: Path | str,
         extra_config: dict[str, Any] | None = None) -> Path:
    """`model` saved as a Hugging Face directory (safetensors) with `tokenizer_from`'s tokenizer
    (a directory holding one, or a tokenizer.json's text)."""
    model.save_pretrained(path, safe_serialization=True)
    if isinstance(tokenizer_from, Path):
        shutil.copy(tokenizer_from / "tokenizer.json", path / "tokenizer.json")
    else:
        (path / "tokenizer.json").write_text(tokenizer_from)
    if extra_config:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **extra_config}))
    return path


def task_dir(kind: str, root: Path, tokenizer_from: Path) -> Path:
    """A directory of `kind`: classifier, multilabel, regression, ner, ner_roberta, ner_xlmr,
    cross_encoder, fill_mask, qa, gpt2."""
    import transformers
    from tokenizers import Tokenizer

    from tests.optimize.families import ROBERTA_SPECIALS, trained_tokenizer

    torch.manual_seed(0)
    bert = {**BERT, "initializer_range": SPREAD.get(kind, 0.02)}
    trained = trained_tokenizer(TRAINED_TOKENIZERS[kind]) if kind in TRAINED_TOKENIZERS else None
    roberta = {**bert, **ROBERTA_SPECIALS, "max_position_embeddings": 66, "type_vocab_size": 1,
               "vocab_size": Tokenizer.from_str(trained).get_vocab_size() if trained else bert["vocab_size"]}
    ner = {"num_labels": 5, "id2label": NER_LABELS, "label2id": {v: k for k, v in NER_LABELS.items()}}
    made = {
        "classifier": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
            **bert, num_labels=3, id2label=SENTIMENT_LABELS, label2id={v: k for k, v in SENTIMENT_LABELS.items()})),
        "multilabel": lambda: transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            **roberta, num_labels=4, problem_type="multi_label_classification", id2label=TOPIC_LABELS,
            label2id={v: k for k, v in TOPIC_LABELS.items()})),
        "regression": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
            **bert, num_labels=1, problem_type="regression")),
        "ner": lambda: transformers.BertForTokenClassification(transformers.BertConfig(**bert, **ner)),
        "ner_roberta": lambda: transformers.RobertaForTokenClassification(transformers.RobertaConfig(**roberta, **ner)),
        "ner_xlmr": lambda: transformers.XLMRobertaForTokenClassification(transformers.XLMRobertaConfig(**roberta, **ner)),
        "cross_encoder": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**bert, num_labels=1)),
        "fill_mask": lambda: transformers.BertForMaskedLM(transformers.BertConfig(**bert)),
        "qa": lambda: transformers.BertForQuestionAnswering(transformers.BertConfig(**bert)),
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_head=2, n_layer=2, vocab_size=30522, n_positions=128, bos_token_id=101, eos_token_id=102)),
    }
    extra = CROSS_ENCODER if kind == "cross_encoder" else None
    return save(made[kind]().eval(), root / kind, trained or tokenizer_from, extra)
