"""Masked softmax against torch eager and torch.compile."""

from __future__ import annotations

import pytest
import torch
from bench.kernels.harness import compiled, row_op_target, run_case

from kiln_kernels.softmax import softmax_cost, softmax_triton

# (batch, heads, rows per head, row width): attention scores at BERT lengths, then wide rows
SHAPES = [(32, 12, 384, 384), (16, 16, 512, 512), (4, 16, 64, 4096), (2, 16, 32, 8192),
          (1, 8, 32, 32768)]


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_softmax(benchmark, ceilings, dtype, shape, masked):
    b, h, s, n = shape
    x = torch.randn(b, h, s, n, device="cuda", dtype=dtype)
    mask = None
    if masked:  # BERT's extended attention mask: [B, 1, 1, N], a padded tail per sequence
        mask = torch.zeros(b, 1, 1, n, device="cuda", dtype=dtype)
        mask[..., n - n // 4:] = torch.finfo(dtype).min

    def eager():
        return torch.softmax((x + mask if mask is not None else x).float(), dim=-1).to(dtype)

    run_case(
        benchmark, ceilings,
        op="softmax",
        cost=softmax_cost(b * h * s, n, dtype, mask_numel=mask.numel() if masked else 0),
        kernel=lambda: softmax_triton(x, mask),
        baselines={"eager": eager, "compile": compiled(eager)},
        shape={"batch": b, "heads": h, "rows": s, "width": n, "mask": "[B,1,1,N]" if masked else None},
        dtype=dtype,
        target=row_op_target(n),
    )
