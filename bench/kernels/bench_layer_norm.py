"""LayerNorm (+ fused residual add) against torch eager and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench.kernels.harness import compiled, row_op_target, run_case

from kiln_kernels.layer_norm import layer_norm_cost, layer_norm_triton

ROWS = 8192  # e.g. 64 sequences of 128 tokens
WIDTHS = [384, 768, 1024, 4096, 8192, 16384, 32768]  # 32768: the looped wide-row path


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_layer_norm(benchmark, ceilings, dtype, width, residual):
    x = torch.randn(ROWS, width, device="cuda", dtype=dtype)
    r = torch.randn_like(x) if residual else None
    w = torch.randn(width, device="cuda", dtype=dtype)
    b = torch.randn(width, device="cuda", dtype=dtype)
    eps = 1e-5

    if residual:
        def eager():
            h = x + r
            return F.layer_norm(h, (width,), w, b, eps), h
    else:
        def eager():
            return F.layer_norm(x, (width,), w, b, eps)

    run_case(
        benchmark, ceilings,
        op="add_layer_norm" if residual else "layer_norm",
        cost=layer_norm_cost(ROWS, width, dtype, residual=residual),
        kernel=lambda: layer_norm_triton(x, w, b, eps, r),
        baselines={"eager": eager, "compile": compiled(eager)},
        shape={"rows": ROWS, "hidden": width},
        dtype=dtype,
        target=row_op_target(width),
    )
