"""The triton backend's passes on BERT-base and GPT-2 small (random weights, 2 layers): how many
blocks each fusion matches (per layer, so the counts scale with depth), accuracy against fp32
eager, and packed execution against padded execution on batches of mixed lengths.

all-MiniLM-L6-v2 (real weights, 6 layers) goes through the whole compiler in
test_triton_backend.py with the same per-layer counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from optimize.capture import capture
from optimize.passes import PassContext, PassResult, run_passes
from optimize.passes import order
from optimize.passes.remove_padding import RemovePadding
from optimize.runtime.config import CompileConfig
from optimize.sources import load_source
from optimize.verify import compare, compare_real_tokens
from tests.optimize.hf_random import hf_dir

LAYERS = 2


def expected_counts(architecture: str, layers: int) -> dict[str, dict[str, int]]:
    """What each pass matches, per architecture, as a function of depth."""
    if architecture == "bert":  # post-LN encoder: separate q/k/v linears, BERT embeddings
        return {
            "fuse_attention": {"sdpa": layers, "explicit": 0},
            "fuse_qkv": {"groups": layers, "linears": 3 * layers},
            "fuse_embedding_layer_norm": {"embedding_layer_norm": 1},
            "fuse_residual_layer_norm": {"add_layer_norm": 2 * layers},
            "fuse_bias_gelu": {"bias_gelu": layers, "gelu": 0},
        }
    # GPT-2: c_attn is one GEMM already (no QKV group); the embedding sum is also the first
    # residual (no embedding + LN); ln_2 of every layer, ln_1 of all but the first, and ln_f
    # follow a same-shape residual add (2L); gelu_new is the tanh formula, after a Conv1D bias.
    return {
        "fuse_attention": {"sdpa": layers, "explicit": 0},
        "fuse_qkv": {"groups": 0, "linears": 0},
        "fuse_embedding_layer_norm": {"embedding_layer_norm": 0},
        "fuse_residual_layer_norm": {"add_layer_norm": 2 * layers},
        "fuse_bias_gelu": {"bias_gelu": layers, "gelu": 0},
    }


@dataclass
class Fused:
    results: dict[str, PassResult]
    feeds: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]
    padded: dict[str, torch.Tensor]
    packed: dict[str, torch.Tensor]
    packing: PassResult


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def fused(request: pytest.FixtureRequest) -> tuple[str, Fused]:
    """Fuse with every triton pass but padding removal, run; then remove padding, run again."""
    architecture = request.param
    config = CompileConfig(backend="triton", max_batch=4, max_seq=32, passes={"remove_padding": False})
    src = load_source(hf_dir(architecture, LAYERS), config)
    gm = capture(src).module()
    fx_passes = frozenset(order.names(order.FX))
    results = {r.name: r for r in run_passes(gm, PassContext(config, src.inputs, "triton"), fx_passes)}
    feeds = src.make_inputs({"batch": 4, "seq": 19}, torch.Generator().manual_seed(3))
    assert len(set(feeds["attention_mask"].sum(1).tolist())) > 1, "the batch must mix lengths"
    with torch.inference_mode():
        reference, padded = src.module(**feeds), gm(**feeds)
    packing = PassResult("remove_padding", RemovePadding().run(gm, PassContext(config, src.inputs, "triton")))
    gm.recompile()
    with torch.inference_mode():
        packed = gm(**feeds)
    return architecture, Fused(results, feeds, reference, padded, packed, packing)


def test_fusion_counts_follow_the_architecture_and_scale_with_layers(fused: tuple[str, Fused]) -> None:
    architecture, f = fused
    for name, counts in expected_counts(architecture, LAYERS).items():
        assert f.results[name].matches == counts, name
    assert f.results["quantize"].skipped and f.results["mixed_precision"].skipped  # fp32
    assert f.packing.matches["packed_attention"] == LAYERS


def test_fused_graph_matches_fp32_eager(fused: tuple[str, Fused]) -> None:
    _, f = fused
    for name, stats in compare(f.reference, f.padded).items():
        assert stats["max_abs_error"] < 1e-4 and stats["min_cosine"] > 0.99999, name


def test_packed_mode_gives_the_padded_outputs_at_real_tokens_and_zeros_at_padding(fused: tuple[str, Fused]) -> None:
    _, f = fused
    for name, stats in compare_real_tokens(f.feeds, f.padded, f.packed).items():
        assert stats["max_abs_error"] < 1e-5, name
    padding = f.feeds["attention_mask"] == 0
    assert padding.any()
    assert bool((f.packed["last_hidden_state"][padding] == 0).all())


def test_packing_gathers_once_and_restores_only_at_the_output(fused: tuple[str, Fused]) -> None:
    _, f = fused
    # gathered: the embedding output; restored: last_hidden_state (the only output)
    assert f.packing.matches["gathered"] == 1
    assert f.packing.matches["restored"] == 1
