"""Backend `triton`: engines built through the whole compiler (CLI included), verified against
fp32 eager, stored, reloaded, run; what it refuses; verification mode over its fusions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import optimize
from optimize.cli import main
from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import AccuracyError, ConfigError
from optimize.sources import load_source
from optimize.verify import compare_real_tokens
from tests.optimize.hf_random import TINY_BERT, hf_dir

import kiln_kernels  # noqa: F401  (registers torch.ops.kiln)


@pytest.fixture(scope="module")
def minilm_triton(tmp_path_factory: pytest.TempPathFactory, minilm_model_dir: Path) -> Path:
    """all-MiniLM-L6-v2 compiled by `python -m optimize compile --backend triton` (fp32)."""
    out = tmp_path_factory.mktemp("triton") / "minilm"
    argv = ["compile", str(minilm_model_dir), "-o", str(out), "--backend", "triton", "--max-batch", "4",
            "--max-seq", "64"]
    assert main(argv) == 0
    return out


def test_cli_builds_a_verified_minilm_engine_with_every_block_fused(minilm_triton: Path):
    engine = optimize.load(minilm_triton)
    matches = {p["pass"]: p["matches"] for p in engine.manifest.passes}
    layers = 6
    assert matches["fuse_attention"]["sdpa"] == layers
    assert matches["fuse_qkv"] == {"groups": layers, "linears": 3 * layers}
    assert matches["fuse_bias_gelu"]["bias_gelu"] == layers
    assert matches["fuse_residual_layer_norm"]["add_layer_norm"] == 2 * layers
    assert matches["fuse_embedding_layer_norm"]["embedding_layer_norm"] == 1
    assert matches["remove_padding"]["packed_attention"] == layers
    assert engine.manifest.build["kernels"]["kiln.attention_varlen"] == layers
    acc, tol = engine.manifest.accuracy, engine.manifest.config.tolerance
    assert acc["max_abs_error"] <= tol.max_abs_error and acc["samples"]["min_cosine"] >= tol.min_cosine


def test_packed_engine_says_so_and_matches_eager_on_mixed_lengths(minilm_triton: Path, minilm_model_dir: Path):
    engine = optimize.load(minilm_triton)
    assert engine.accepts_packed and engine.packed_mask_input == "attention_mask"
    texts = ["a short one", "a considerably longer sentence, with a clause, to pad the others against"]
    feeds = engine.pipeline.tokenize(texts)
    got = engine.run(feeds)  # numpy in, numpy out
    assert isinstance(got["sentence_embedding"], np.ndarray)
    src = load_source(minilm_model_dir, CompileConfig(max_batch=4, max_seq=64))
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.inference_mode():
        expected = src.module(**tensors)
    stats = compare_real_tokens(tensors, expected, {k: torch.from_numpy(v) for k, v in got.items()})
    assert all(s["max_abs_error"] < 1e-4 for s in stats.values())
    padding = feeds["attention_mask"] == 0
    assert padding.any() and (got["last_hidden_state"][padding] == 0).all()


def test_run_packed_takes_rows_back_to_back_and_returns_them_per_token(minilm_triton: Path):
    """The server's packed layout: token inputs concatenated, rows delimited by cu_seqlens."""
    engine = optimize.load(minilm_triton)
    g = torch.Generator().manual_seed(0)
    lengths = [5, 12, 1]
    rows = [{"input_ids": torch.randint(1000, 2000, (1, n), generator=g),
             "attention_mask": torch.ones(1, n, dtype=torch.long)} for n in lengths]
    packed = {name: torch.cat([r[name][0] for r in rows]).numpy() for name in ("input_ids", "attention_mask")}
    packed["cu_seqlens"] = np.array([0, 5, 17, 18], dtype=np.int32)
    got = engine.run_packed(packed)
    assert got["last_hidden_state"].shape == (sum(lengths), 384)
    assert got["sentence_embedding"].shape == (3, 384)
    for i, (row, start) in enumerate(zip(rows, packed["cu_seqlens"])):
        alone = engine.run(row)
        end = start + lengths[i]
        torch.testing.assert_close(torch.from_numpy(got["last_hidden_state"][start:end]),
                                   alone["last_hidden_state"][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(got["sentence_embedding"][i]), alone["sentence_embedding"][0],
                                   atol=1e-5, rtol=1e-5)


def test_minilm_runs_packed_batches_as_they_come_and_answers_as_sentence_transformers(
        minilm_triton: Path, minilm_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Fresh random lengths through the packed entry: no padded batch is ever built."""
    engine = optimize.load(minilm_triton)
    assert engine.has_packed_entry, engine.manifest.build["packed_batches"]
    packing = {"kiln_cuda.pack_indices", "kiln_cuda.gather_rows", "kiln_cuda.scatter_rows"}
    assert not packing & {str(n.target).removesuffix(".default") for n in engine._packed.graph.nodes}
    rng = np.random.default_rng()
    lengths = rng.integers(1, 65, size=int(rng.integers(1, 5))).tolist()
    ids = [torch.from_numpy(rng.integers(1000, 20000, size=n)) for n in lengths]
    packed = {"input_ids": torch.cat(ids).numpy(), "attention_mask": np.ones(sum(lengths), dtype=np.int64),
              "cu_seqlens": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)}
    monkeypatch.setattr(engine, "run", lambda *a: pytest.fail("run_packed padded the batch"))
    got = engine.run_packed(packed)
    src = load_source(minilm_model_dir, CompileConfig(max_batch=4, max_seq=64))
    padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
    mask = (torch.arange(padded.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    with torch.inference_mode():
        expected = src.module(input_ids=padded, attention_mask=mask)
    real = mask.bool()
    np.testing.assert_allclose(got["last_hidden_state"], expected["last_hidden_state"][real].numpy(),
                               atol=1e-4, rtol=1e-4, err_msg=str(lengths))
    np.testing.assert_allclose(got["sentence_embedding"], expected["sentence_embedding"].numpy(),
                               atol=1e-5, rtol=1e-4, err_msg=str(lengths))


@pytest.mark.parametrize("precision, packed", [("fp16", True), ("bf16", False), ("int8-weight", True)])
def test_reduced_precisions_build_and_verify_on_cpu(tmp_path: Path, precision: str, packed: bool):
    config = CompileConfig(backend="triton", precision=precision, max_batch=4, max_seq=32, verify_samples=2,
                           passes={} if packed else {"remove_padding": False})
    engine = optimize.compile(hf_dir("bert", 2, **TINY_BERT), tmp_path / "e", config)
    assert engine.accepts_packed is packed and engine.has_packed_entry is packed
    assert {s.dtype for s in engine.outputs} == {"float32"}  # the contract stays fp32
    kernels_used = engine.manifest.build["kernels"]
    if precision == "int8-weight":
        assert kernels_used["kiln.int8_weight_linear"] == 2 * 4  # qkv, out, up, down per layer
    x = {"input_ids": torch.randint(0, 1000, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    assert engine.run(x)["last_hidden_state"].dtype == torch.float32


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_precisions_without_kernels_are_a_config_error(tmp_path: Path, precision: str):
    with pytest.raises(ConfigError, match="backend 'triton' supports precision"):
        optimize.compile(hf_dir("bert", 2, **TINY_BERT), tmp_path / "e",
                         CompileConfig(backend="triton", precision=precision))


@pytest.mark.parametrize("options, message", [
    ({"device": "tpu"}, "device must be one of"),
    ({"max_cuda_graphs": -1}, "max_cuda_graphs"),
    ({"graphs": True}, "has no option"),
])
def test_bad_backend_options_are_a_config_error(tmp_path: Path, options: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        optimize.compile(hf_dir("bert", 2, **TINY_BERT), tmp_path / "e",
                         CompileConfig(backend="triton", backend_options=options))


def test_verification_mode_names_a_broken_fusion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from optimize.passes import fuse_bias_gelu

    def wrong_sign(gm, fused):  # a bug: the rewrite feeds GELU the negated activations
        with gm.graph.inserting_before(fused):
            neg = gm.graph.call_function(torch.ops.aten.neg.default, (fused.args[0],))
        fused.args = (neg, *fused.args[1:])
        return False

    monkeypatch.setattr(fuse_bias_gelu, "_move_bias_in", wrong_sign)
    config = CompileConfig(backend="triton", max_batch=2, max_seq=16, verify_passes=True)
    with pytest.raises(AccuracyError, match="pass fuse_bias_gelu broke accuracy"):
        optimize.compile(hf_dir("bert", 2, **TINY_BERT), tmp_path / "e", config)
    assert not (tmp_path / "e").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_engine_runs_the_kernels_and_matches_eager(tmp_path: Path, packed: bool):
    config = CompileConfig(backend="triton", precision="fp16", max_batch=4, max_seq=32,
                           passes={} if packed else {"remove_padding": False})
    source = hf_dir("bert", 2, **TINY_BERT)
    engine = optimize.compile(source, tmp_path / "e", config)
    assert engine.uses_cuda_graphs is not packed  # packed sizes change per batch: no graphs
    src = load_source(source, config)
    feeds = src.make_inputs({"batch": 3, "seq": 17}, torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = src.module(**feeds)
    for _ in range(2):  # capture, then replay
        stats = compare_real_tokens(feeds, expected, engine.run(feeds))
        assert all(s["min_cosine"] > 0.999 for s in stats.values())
    assert engine.has_packed_entry is packed
    if packed:  # the packed entry on the GPU's kernels: the padded answers at the real tokens
        real = feeds["attention_mask"] != 0
        inputs = {k: v[real] for k, v in feeds.items()}
        inputs["cu_seqlens"] = torch.cat([torch.zeros(1), real.sum(1).cumsum(0)]).to(torch.int32)
        got = engine.run_packed(inputs)["last_hidden_state"]
        torch.testing.assert_close(got, engine.run(feeds)["last_hidden_state"][real], atol=2e-3, rtol=2e-3)
