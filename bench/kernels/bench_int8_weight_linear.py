"""int8-weight linear against the fp16/bf16 torch matmul, eager dequantize-then-matmul and its
torch.compile (gpt-fast's int8 weight-only path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench.kernels.harness import compiled, run_case

from kiln_kernels.int8_weight_linear import int8_weight_linear_cost, int8_weight_linear_triton, quantize_int8_per_channel

# (N, K): Llama-7B attention projection, MLP up, MLP down; BERT-base FFN up
LAYERS = [(4096, 4096), (11008, 4096), (4096, 11008), (3072, 768)]
BATCHES = [1, 4, 16, 64, 512]


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_int8_weight_linear(benchmark, ceilings, dtype, m, layer, activation):
    n, k = layer
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    w_int8, scale = quantize_int8_per_channel(w)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w_deq = (w_int8.to(torch.float32) * scale[:, None]).to(dtype)  # what the fp16 baseline multiplies
    act = {"none": lambda y: y, "gelu": F.gelu}[activation]

    def half_matmul():
        return act(F.linear(x, w_deq, bias))

    def dequant_matmul():
        return act(F.linear(x, w_int8.to(dtype) * scale[:, None].to(dtype), bias))

    run_case(
        benchmark, ceilings,
        op="int8_weight_linear",
        cost=int8_weight_linear_cost(m, n, k, dtype, activation=activation),
        kernel=lambda: int8_weight_linear_triton(x, w_int8, scale, bias, activation),
        baselines={"matmul": half_matmul, "eager": dequant_matmul, "compile": compiled(dequant_matmul)},
        shape={"m": m, "n": n, "k": k, "activation": activation},
        dtype=dtype,
        check_against="matmul",
        atol=5e-2,
        rtol=5e-2,
        target=("batch <= 16: faster than the half-precision torch matmul", "speedup_vs_matmul", 1.0)
        if m <= 16 else None,
    )
