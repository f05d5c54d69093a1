"""RMSNorm (+ fused residual add) against torch eager and torch.compile."""

from __future__ import annotations

import pytest
import torch
from bench.kernels.harness import compiled, row_op_target, run_case

from kiln_kernels.rms_norm import rms_norm_cost, rms_norm_triton

ROWS = 8192
WIDTHS = [768, 2048, 4096, 8192, 16384, 32768]


def _rms_norm_eager(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rms_norm(benchmark, ceilings, dtype, width, residual):
    x = torch.randn(ROWS, width, device="cuda", dtype=dtype)
    r = torch.randn_like(x) if residual else None
    w = torch.randn(width, device="cuda", dtype=dtype)
    eps = 1e-6

    if residual:
        def eager():
            h = x + r
            return _rms_norm_eager(h, w, eps), h
    else:
        def eager():
            return _rms_norm_eager(x, w, eps)

    run_case(
        benchmark, ceilings,
        op="add_rms_norm" if residual else "rms_norm",
        cost=rms_norm_cost(ROWS, width, dtype, residual=residual),
        kernel=lambda: rms_norm_triton(x, w, eps, r),
        baselines={"eager": eager, "compile": compiled(eager)},
        shape={"rows": ROWS, "hidden": width},
        dtype=dtype,
        target=row_op_target(width),
    )
