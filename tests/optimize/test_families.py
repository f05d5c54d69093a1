"""Model families end to end: every family kiln supports compiles as a sentence-embedding engine on
every CPU backend that can express it (verified against fp32 eager by the compiler itself) and
embeds real sentences exactly as the transformers model pooled the same way; a backend that
cannot build a family refuses it by name in one line, and so does torch.export.

Families are tiny random-weight models built from each family's transformers config
(tests/optimize/families.py). Engines are compiled once per session (tests/conftest.py) and shared
by these tests and the served families of tests/server/test_family_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import optimize
from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import CaptureError, ConfigError, OptimizeError
from tests.optimize.families import FAMILIES, compile_config, pooled, write_pooling

SENTENCES = ["A man is playing a guitar.", "The new movie is awesome, I loved every minute of it!",
             "How do I reset my password?", "Thanks!"]
BACKENDS = ("onnxruntime", "triton", "eager", "openvino")
# OpenVINO converts the same ONNX graph ONNX Runtime runs; it is tried on the families whose graphs
# hold ops BERT's does not (BERT itself is all-MiniLM-L6-v2 in backends/test_openvino.py): RoBERTa's
# positions from the ids, GPT-2's causal mask, MPNet's and DeBERTa's relative positions,
# ModernBERT's rotary and sliding-window attention, Qwen2's RMSNorm, rotary and grouped-query
# attention. The other families built on OpenVINO as well when this was written; each costs
# about 5 s of CI.
OPENVINO_FAMILIES = ("roberta", "gpt2", "mpnet", "modernbert", "deberta-v2", "qwen2")
MATRIX = [(f, b) for f in FAMILIES for b in BACKENDS if b != "openvino" or f in OPENVINO_FAMILIES]
# The families CTranslate2's converter turns into encoders; it refuses the others by name.
CTRANSLATE2_BUILDS = ("bert", "distilbert", "roberta", "xlm-roberta")
# Attention layers the triton backend runs on packed tokens (kiln.attention_varlen), per
# family: MPNet's and DeBERTa's attention add relative-position scores (not a padding mask),
# so it stays as exported; ModernBERT's sliding-window layer likewise (its global layer packs).
PACKED_LAYERS = {"bert": 1, "roberta": 1, "xlm-roberta": 1, "distilbert": 1, "electra": 1, "mpnet": 0,
                 "modernbert": 1, "deberta-v2": 0, "gpt2": 1, "qwen2": 1}
# Families whose triton engine also takes packed batches as they come (a packed entry,
# optimize.passes.packed_entry); ModernBERT's sliding window and Qwen2's rotary positions are
# refused by it, so their packed batches are padded once inside run_packed.
PACKED_ENTRY = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "gpt2"}


@pytest.fixture(scope="module")
def dirs(family_dirs: dict[str, Path]) -> dict[str, Path]:
    return family_dirs


@pytest.fixture(scope="module")
def engines(family_engine: Any) -> Any:
    """`engines(family, backend)`: the engine compiled for it (once per session, shared with the
    served families of tests/server/test_family_e2e.py), loaded."""
    return lambda family, backend: optimize.load(family_engine(family, backend))


def transformers_embedding(path: Path, feeds: dict[str, np.ndarray], pooling: str, normalize: bool) -> np.ndarray:
    import transformers

    model = transformers.AutoModel.from_pretrained(str(path)).eval()
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        hidden = model(**tensors).last_hidden_state
    return pooled(hidden, tensors["attention_mask"], pooling, normalize).numpy()


def left_padded(feeds: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """The same token rows padded on the left (as decoder embedders' tokenizers pad)."""
    ids, mask = np.full_like(feeds["input_ids"], pad_id), np.zeros_like(feeds["attention_mask"])
    for row, (tokens, real) in enumerate(zip(feeds["input_ids"], feeds["attention_mask"], strict=True)):
        n = int(real.sum())
        ids[row, -n:], mask[row, -n:] = tokens[:n], 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family, backend", MATRIX)
def test_family_compiles_verified_and_embeds_sentences_as_transformers(family: str, backend: str, dirs, engines):
    engine = engines(family, backend)
    spec = FAMILIES[family]
    manifest = json.loads((engine.path / "manifest.json").read_text())
    assert manifest["accuracy"]["judged_on"] == ["random inputs", "real samples"]
    assert engine.pipeline is not None and engine.pipeline.output == "sentence_embedding"
    feeds = engine.pipeline.tokenize(SENTENCES)
    assert feeds["attention_mask"].sum(1).min() < feeds["attention_mask"].shape[1], "the batch must be padded"
    got = engine.run(feeds)["sentence_embedding"]
    want = transformers_embedding(dirs[family], feeds, spec.pooling, spec.normalize)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    if backend == "triton":
        packing = next(p for p in manifest["passes"] if p["pass"] == "remove_padding")
        assert packing["matches"].get("packed_attention", 0) == PACKED_LAYERS[family], packing
        assert engine.accepts_packed == bool(PACKED_LAYERS[family])
        assert engine.has_packed_entry == (family in PACKED_ENTRY), manifest["build"]["packed_batches"]
        real = feeds["attention_mask"] != 0
        packed = {k: v[real] for k, v in feeds.items()}
        packed["cu_seqlens"] = np.concatenate([[0], np.cumsum(real.sum(1))]).astype(np.int32)
        np.testing.assert_allclose(engine.run_packed(packed)["sentence_embedding"], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_decoder_embedder_pools_the_last_real_token_with_either_padding(backend: str, dirs, engines):
    engine = engines("qwen2", backend)
    assert engine.pipeline is not None
    right = engine.pipeline.tokenize(SENTENCES)
    left = left_padded(right, engine.pipeline.pad_id)
    assert not left["attention_mask"][:, 0].all() and not right["attention_mask"][:, -1].all()
    from_right, from_left = engine.run(right)["sentence_embedding"], engine.run(left)["sentence_embedding"]
    # rotary positions are relative: transformers' own embedding does not depend on the side either
    np.testing.assert_allclose(from_left, transformers_embedding(dirs["qwen2"], left, "lasttoken", True), atol=2e-5)
    np.testing.assert_allclose(from_left, from_right, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(from_left, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_ctranslate2_builds_the_encoders_it_converts_and_refuses_the_rest_by_name(family: str, dirs, engines,
                                                                                  tmp_path: Path):
    pytest.importorskip("ctranslate2")
    if family not in CTRANSLATE2_BUILDS:
        with pytest.raises(ConfigError) as refused:
            optimize.compile(dirs[family], tmp_path / "e", compile_config("ctranslate2"))
        message = str(refused.value)
        assert "backend 'ctranslate2'" in message and dirs[family].name in message and "\n" not in message
        assert not (tmp_path / "e").exists()
        return
    engine = engines(family, "ctranslate2")
    feeds = engine.pipeline.tokenize(SENTENCES)  # type: ignore[union-attr]
    want = transformers_embedding(dirs[family], feeds, "mean", False)
    np.testing.assert_allclose(engine.run(feeds)["sentence_embedding"], want, atol=2e-5, rtol=1e-4)


def test_a_family_torch_export_cannot_capture_is_refused_in_one_line_naming_it(tmp_path: Path, capfd):
    import transformers

    # Longformer pads to its attention window and slides chunks with data-dependent shapes
    model = transformers.LongformerModel(transformers.LongformerConfig(
        hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1, vocab_size=100,
        attention_window=[8], max_position_embeddings=66))
    model.save_pretrained(tmp_path / "longformer", safe_serialization=True)
    write_pooling(tmp_path / "longformer", 32, "mean", False)
    with pytest.raises(CaptureError) as refused:
        optimize.compile(tmp_path / "longformer", tmp_path / "e", compile_config("eager"))
    message = str(refused.value)
    assert message.startswith("torch.export cannot capture longformer (LongformerModel): ") and "\n" not in message
    assert len(capfd.readouterr().err.splitlines()) < 5, "torch.export's partial graph dump reached the console"
    assert not (tmp_path / "e").exists()


def test_roberta_style_positions_after_the_pad_id_bound_the_sequence_length(dirs):
    from optimize.sources import load_source

    # RoBERTa numbers positions from pad id + 1: 66 position embeddings hold 64 tokens
    assert load_source(dirs["roberta"], CompileConfig(max_batch=2, max_seq=64)).inputs[0].shape[1].max == 64
    with pytest.raises(OptimizeError, match=r"max_seq 65 exceeds the model's 64 positions \(roberta, RobertaModel\)"):
        load_source(dirs["roberta"], CompileConfig(max_batch=2, max_seq=65))
