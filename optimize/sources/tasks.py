"""Tasks: which head of a Hugging Face model an engine computes, and what it answers.

A fine-tuned directory says what it is: `architectures` in config.json names the head
(`BertForSequenceClassification`, `RobertaForTokenClassification`, `GPT2LMHeadModel`, ...), a
sentence-transformers directory has `modules.json`, a cross-encoder carries a
`sentence_transformers` entry in its config. kiln builds the head the directory describes, or
the one `--task` names, and refuses by name what it cannot build: an engine that silently lacks
its head (a classifier answering hidden states) is the worst kind of wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from optimize.runtime.errors import SourceError


@dataclass(frozen=True)
class Task:
    """One task kiln builds. `auto_class` is the transformers class that loads its head;
    `head_suffixes` are the architecture-name endings that mean this head."""

    name: str
    auto_class: str
    head_suffixes: tuple[str, ...]
    outputs: tuple[str, ...]
    summary: str


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("feature-extraction", "AutoModel", (), ("last_hidden_state", "sentence_embedding"),
             "token states, and the pooled embedding the directory declares"),
        Task("text-classification", "AutoModelForSequenceClassification", ("ForSequenceClassification",),
             ("logits",), "one label distribution (or score) per text"),
        Task("token-classification", "AutoModelForTokenClassification", ("ForTokenClassification",),
             ("logits",), "one label distribution per token (NER)"),
        Task("sentence-pair", "AutoModelForSequenceClassification", ("ForSequenceClassification",),
             ("logits",), "one score per pair of texts (cross-encoders, rerankers)"),
        Task("fill-mask", "AutoModelForMaskedLM", ("ForMaskedLM",), ("logits",), "vocabulary logits per token"),
        Task("causal-lm", "AutoModelForCausalLM", ("ForCausalLM", "LMHeadModel"), ("logits",),
             "next-token logits per position (no generation loop)"),
    )
}

# Heads transformers has that kiln does not build; named in the refusal.
_OTHER_HEADS = ("ForQuestionAnswering", "ForMultipleChoice", "ForPreTraining", "ForNextSentencePrediction",
                "ForConditionalGeneration", "ForImageClassification", "ForAudioClassification", "ForCTC",
                "ForSpeechSeq2Seq", "ForSeq2SeqLM", "WithLMHead", "ForVision2Seq", "ForImageTextToText")


def head_of(architecture: str) -> str | None:
    """The head suffix of an architecture name (`"ForSequenceClassification"`), None for a
    bare model (`"BertModel"`)."""
    for task in TASKS.values():
        for suffix in task.head_suffixes:
            if architecture.endswith(suffix):
                return suffix
    for suffix in _OTHER_HEADS:
        if architecture.endswith(suffix):
            return suffix
    # "For" + a capital starts a head ("ForMaskedLM"), not a model name ("RoFormerModel")
    heads = [m.start() for m in re.finditer(r"For[A-Z]", architecture) if m.start() > 0]
    return architecture[heads[-1]:] if heads else None


def buildable_tasks(architecture: str) -> list[str]:
    """The tasks a directory of `architecture` can build with its own weights: its head's
    tasks, and always feature-extraction (the encoder alone, when asked for by name)."""
    suffix = head_of(architecture)
    tasks = [t.name for t in TASKS.values() if suffix is not None and suffix in t.head_suffixes]
    return tasks + ["feature-extraction"] if "feature-extraction" not in tasks else tasks


def detect_task(architecture: str, hf_config: dict[str, Any], requested: str | None) -> Task:
    """The task to build: `requested` (the `--task` flag) when given, else the one the
    directory describes. Raises `SourceError` naming the architecture and the tasks it can
    build when the head is one kiln does not build, or `requested` does not fit the weights."""
    can = buildable_tasks(architecture)
    if requested is not None:
        if requested not in TASKS:
            raise SourceError(f"unknown task {requested!r}; kiln builds: {', '.join(TASKS)}")
        if requested not in can:
            raise SourceError(f"{architecture} has no {requested} head; it can build: {', '.join(can)}")
        return TASKS[requested]
    suffix = head_of(architecture)
    if suffix is None:
        return TASKS["feature-extraction"]
    if suffix == "ForSequenceClassification" and "sentence_transformers" in hf_config:
        return TASKS["sentence-pair"]  # a sentence-transformers CrossEncoder
    for task in TASKS.values():
        if suffix in task.head_suffixes:
            return task
    raise SourceError(f"{architecture}: kiln cannot build its {suffix} head; it can build: {', '.join(can)} "
                      "(--task feature-extraction compiles the encoder without the head)")


def classifier_activation(hf_config: dict[str, Any], task: Task) -> str:
    """The function that turns logits into scores, as transformers' pipelines and
    sentence-transformers' CrossEncoder choose it: "softmax", "sigmoid" or "none"."""
    num_labels = len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 2))
    problem = hf_config.get("problem_type")
    if task.name == "sentence-pair":
        activation = (hf_config.get("sentence_transformers") or {}).get("activation_fn") or ""
        if activation.endswith("Identity"):
            return "none"
        if activation.endswith("Sigmoid"):
            return "sigmoid"
        if activation.endswith("Softmax"):
            return "softmax"
        # CrossEncoder's default: sigmoid for one score, the raw logits for more
        return "sigmoid" if num_labels == 1 else "none"
    if problem == "regression":
        return "none"
    if problem == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


def labels_of(hf_config: dict[str, Any]) -> list[str]:
    """Label names in id order (id2label), `LABEL_i` where the directory names none."""
    id2label = hf_config.get("id2label") or {}
    count = len(id2label) or int(hf_config.get("num_labels", 0))
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count)]
