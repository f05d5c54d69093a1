"""Task heads of Hugging Face directories: built as the directory describes (or as `--task`
says), answered as transformers answers, and refused by name when kiln cannot build them.

Models are tiny random-weight ones built from transformers configs with BERT's vocabulary, so
the all-MiniLM-L6-v2 tokenizer shipped with the test model tokenizes real sentences for them (the
multi-label classifier is a RoBERTa with a byte-level BPE tokenizer). The engines of the heads
are compiled once per session on the backends tests/server/test_task_engines.py serves them
with (tests/conftest.py), so every CPU backend builds a head somewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import optimize
from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import ConfigError, SourceError
from optimize.runtime.pipeline import Pipeline
from optimize.sources import load_source

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = ["A man is playing a guitar.", "The new movie is awesome, I loved every minute of it!",
             "How do I reset my password?"]
CONFIG = CompileConfig(backend="onnxruntime", max_batch=4, max_seq=32)
KINDS = ("classifier", "multilabel", "regression", "ner", "cross_encoder", "fill_mask", "qa", "gpt2")


@pytest.fixture(scope="module")
def dirs(task_source: Any) -> dict[str, Path]:
    return {kind: task_source(kind) for kind in KINDS}


def hf_model(path: Path) -> torch.nn.Module:
    import transformers

    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(str(path)).eval()


def pipeline_of(engine: Any) -> Pipeline:
    assert engine.pipeline is not None
    return engine.pipeline


@pytest.mark.parametrize("backend", ["onnxruntime", "eager"])
def test_a_classifier_directory_builds_its_head_and_answers_as_transformers(dirs, task_engine, backend: str):
    engine = optimize.load(task_engine("classifier", backend))
    assert [s.name for s in engine.outputs] == ["logits"], "the classifier head must not be dropped"
    pipeline = pipeline_of(engine)
    assert (pipeline.task, pipeline.labels, pipeline.activation) == (
        "text-classification", ("negative", "neutral", "positive"), "softmax")
    feeds = pipeline.tokenize(SENTENCES)
    got = engine.run(feeds)["logits"]
    with torch.no_grad():
        want = hf_model(dirs["classifier"])(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    manifest = json.loads((engine.path / "manifest.json").read_text())
    assert manifest["source"]["task"] == "text-classification"
    assert manifest["source"]["labels"] == ["negative", "neutral", "positive"]


def test_the_score_function_follows_the_problem_type(dirs):
    for kind, activation, labels in (("multilabel", "sigmoid", ["billing", "shipping", "account", "product"]),
                                     ("regression", "none", ["LABEL_0"])):
        source = load_source(dirs[kind], CONFIG)
        assert source.pipeline is not None
        assert (source.pipeline["task"], source.pipeline["activation"], source.pipeline["labels"]) == (
            "text-classification", activation, labels)


def test_a_token_classifier_answers_one_label_distribution_per_token(dirs, task_engine):
    engine = optimize.load(task_engine("ner", "triton"))  # its packed attention computes real tokens only
    feeds = pipeline_of(engine).tokenize(SENTENCES)
    got = engine.run(feeds)["logits"]
    assert got.shape == (*feeds["input_ids"].shape, 5)
    with torch.no_grad():
        want = hf_model(dirs["ner"])(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    mask = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=1e-4)
    assert pipeline_of(engine).labels[:2] == ("O", "B-PER")


def test_a_cross_encoder_scores_pairs_with_token_types(dirs, task_engine):
    engine = optimize.load(task_engine("cross_encoder", "openvino"))
    assert [s.name for s in engine.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    pipeline = pipeline_of(engine)
    assert (pipeline.task, pipeline.pair, pipeline.activation) == ("sentence-pair", True, "sigmoid")
    feeds = pipeline.tokenize_pairs(["how to reset a password"] * 2, SENTENCES[2:] + SENTENCES[:1])
    assert feeds["token_type_ids"].any(), "the second text must be marked"
    got = engine.run(feeds)["logits"]
    with torch.no_grad():
        want = hf_model(dirs["cross_encoder"])(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert got.shape == (2, 1)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_fill_mask_and_causal_lm_answer_vocabulary_logits(dirs, task_engine):
    for name, task in (("fill_mask", "fill-mask"), ("gpt2", "causal-lm")):
        # GPT-2 on ONNX Runtime once died inside ORT (a fused Gemm over a 3-D input)
        engine = optimize.load(task_engine(name, "onnxruntime"))
        assert pipeline_of(engine).task == task
        ids = np.array([[101, 2023, 2003, 1037, 3231, 102]], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        got = engine.run(feeds)["logits"]
        assert got.shape == (1, 6, 30522)
        with torch.no_grad():
            want = hf_model(dirs[name])(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_head_kiln_cannot_build_is_refused_by_name(dirs):
    with pytest.raises(SourceError) as refused:
        load_source(dirs["qa"], CONFIG)
    message = str(refused.value)
    assert "BertForQuestionAnswering" in message and "ForQuestionAnswering" in message
    assert "feature-extraction" in message and "\n" not in message


def test_a_model_name_containing_for_is_not_a_head():
    from optimize.sources.tasks import detect_task, head_of

    assert head_of("RoFormerModel") is None
    assert head_of("RoFormerForMaskedLM") == "ForMaskedLM"
    assert head_of("RoFormerForQuestionAnswering") == "ForQuestionAnswering"
    assert detect_task("RoFormerModel", {}, None).name == "feature-extraction"


def test_task_flag_picks_a_head_the_weights_have_and_refuses_others(dirs):
    encoder = load_source(dirs["classifier"], CompileConfig(max_batch=4, max_seq=32, task="feature-extraction"))
    assert encoder.metadata["task"] == "feature-extraction"
    pair = load_source(dirs["classifier"], CompileConfig(max_batch=4, max_seq=32, task="sentence-pair"))
    assert [s.name for s in pair.inputs][-1] == "token_type_ids"
    with pytest.raises(SourceError, match="BertForSequenceClassification has no token-classification head; "
                                          "it can build: text-classification, sentence-pair, feature-extraction"):
        load_source(dirs["classifier"], CompileConfig(max_batch=4, max_seq=32, task="token-classification"))
    with pytest.raises(SourceError, match="unknown task 'summarization'"):
        load_source(dirs["classifier"], CompileConfig(max_batch=4, max_seq=32, task="summarization"))
    with pytest.raises(SourceError, match="--task applies to Hugging Face model directories"):
        load_source("tests.optimize.factories:tiny_mlp", CompileConfig(max_batch=4, task="text-classification"))


def test_ctranslate2_refuses_a_classifier_by_name(dirs, tmp_path: Path):
    pytest.importorskip("ctranslate2")
    with pytest.raises(ConfigError, match="builds feature-extraction engines only; task text-classification"):
        optimize.compile(dirs["classifier"], tmp_path / "e", CompileConfig(backend="ctranslate2", max_batch=4, max_seq=32))


def test_auto_picks_among_the_backends_that_can_build_the_head(dirs, tmp_path: Path):
    pytest.importorskip("ctranslate2")
    # two candidates keep it short: one that builds the head, one that cannot express it and is
    # skipped by name before anything is captured for it
    config = CompileConfig(backend="auto", max_batch=4, max_seq=32, verify_samples=1,
                           backend_options={"backends": ["eager", "ctranslate2"], "shapes": ["1x16"]})
    engine = optimize.compile(dirs["classifier"], tmp_path / "e", config)
    auto = engine.manifest.build["auto"]
    table = {c["candidate"]: c for c in auto["candidates"]}
    assert table["ctranslate2/-"]["status"] == "skipped", auto["candidates"]
    assert "builds feature-extraction engines only; task text-classification" in table["ctranslate2/-"]["reason"]
    built = [c for c in table.values() if c["status"] in ("passed", "chosen")]
    assert [c["candidate"] for c in built] == [auto["chosen"]] == ["eager/fp32"], auto["candidates"]
    assert engine.backend == "eager"
    assert [s.name for s in engine.outputs] == ["logits"] and pipeline_of(engine).task == "text-classification"
    feeds = pipeline_of(engine).tokenize(SENTENCES)
    with torch.no_grad():
        want = hf_model(dirs["classifier"])(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(engine.run(feeds)["logits"], want, atol=1e-4, rtol=1e-4)


def test_last_token_pooling_finds_the_last_real_token_with_either_padding():
    from optimize.runtime.pooling import pool

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, right, "last", False), hidden[[0, 1], [1, 3]])
    torch.testing.assert_close(pool(hidden, left, "last", False), hidden[[0, 1], [3, 3]])


def test_cli_names_the_task_and_refuses_an_unknown_one_in_one_line(dirs, tmp_path: Path):
    bad = subprocess.run([sys.executable, "-m", "optimize", "compile", str(dirs["classifier"]), "-o", str(tmp_path / "x"),
                          "--task", "summarization"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in bad.stderr.splitlines() + bad.stdout.splitlines() if line.strip()]
    assert bad.returncode == 1 and len(lines) == 1 and "unknown task 'summarization'" in lines[0], bad.stderr
    good = subprocess.run([sys.executable, "-m", "optimize", "compile", str(dirs["ner"]), "-o", str(tmp_path / "e"),
                           "--max-batch", "2", "--max-seq", "16", "--backend", "onnxruntime"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={"COLUMNS": "200", "PATH": "", "HF_HUB_OFFLINE": "1"})
    assert good.returncode == 0, good.stderr[-2000:]
    assert "token-classification (BertForTokenClassification) — labels O, B-PER" in good.stdout
    assert "output logits" in good.stdout
    assert "text → entities (max_length 16)" in good.stdout  # what a text request sends and gets
