"""Bias + GELU (erf and tanh) against torch eager and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench.kernels.harness import compiled, run_case

from kiln_kernels.bias_gelu import bias_gelu_cost, bias_gelu_triton

# (tokens, intermediate width): BERT-base and -large FFNs, a Llama-sized one
SHAPES = [(8192, 3072), (8192, 4096), (4096, 11008)]


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bias_gelu(benchmark, ceilings, dtype, shape, approximate):
    m, n = shape
    x = torch.randn(m, n, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)

    def eager():
        return F.gelu(x + bias, approximate=approximate)

    run_case(
        benchmark, ceilings,
        op="bias_gelu",
        cost=bias_gelu_cost(m * n, n, dtype, approximate=approximate),
        kernel=lambda: bias_gelu_triton(x, bias, approximate),
        baselines={"eager": eager, "compile": compiled(eager)},
        shape={"tokens": m, "width": n, "approximate": approximate},
        dtype=dtype,
        target=("elementwise: >= 90% of measured copy bandwidth", "frac_copy_bw", 0.9),
    )
