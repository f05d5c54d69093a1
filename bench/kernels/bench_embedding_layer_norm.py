"""Fused BERT embeddings + LayerNorm against torch eager and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench.kernels.harness import compiled, run_case

from kiln_kernels.embedding_layer_norm import embedding_layer_norm_cost, embedding_layer_norm_triton

# (batch, seq, hidden): MiniLM, BERT-base, BERT-large
SHAPES = [(64, 128, 384), (32, 384, 768), (32, 512, 1024)]
VOCAB, MAX_POS = 30522, 512


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_embedding_layer_norm(benchmark, ceilings, dtype, shape):
    b, s, h = shape
    word = torch.randn(VOCAB, h, device="cuda", dtype=dtype)
    pos = torch.randn(MAX_POS, h, device="cuda", dtype=dtype)
    typ = torch.randn(2, h, device="cuda", dtype=dtype)
    w = torch.randn(h, device="cuda", dtype=dtype)
    bias = torch.randn(h, device="cuda", dtype=dtype)
    ids = torch.randint(0, VOCAB, (b, s), device="cuda")
    tt = torch.randint(0, 2, (b, s), device="cuda")
    pos_ids = torch.arange(s, device="cuda")[None]

    def eager():
        return F.layer_norm(word[ids] + pos[pos_ids] + typ[tt], (h,), w, bias, 1e-12)

    run_case(
        benchmark, ceilings,
        op="embedding_layer_norm",
        cost=embedding_layer_norm_cost(b * s, h, dtype),
        kernel=lambda: embedding_layer_norm_triton(ids, word, pos, typ, w, bias, 1e-12, token_type_ids=tt),
        baselines={"eager": eager, "compile": compiled(eager)},
        shape={"batch": b, "seq": s, "hidden": h},
        dtype=dtype,
        target=("BERT width: faster than torch.compile", "speedup_vs_compile", 1.0),
    )
