"""CUDA C++ kernels (csrc/, `kiln_cuda::*`) against the Triton kernels, torch eager and
torch.compile, side by side in the same run (issue 8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench.kernels.harness import compiled, row_op_target, run_case

from kiln_kernels import Cost, native
from kiln_kernels.layer_norm import layer_norm_cost, layer_norm_triton
from kiln_kernels.softmax import softmax_cost, softmax_triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not native.available(), reason="kiln_kernels._C not built or no CUDA device visible to it"),
]
ROWS = 8192  # 64 sequences x 128 tokens


@pytest.mark.parametrize("hidden", [256, 384, 768, 1024])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_residual_layer_norm(benchmark, ceilings, dtype, hidden):
    x = torch.randn(ROWS, hidden, device="cuda", dtype=dtype)
    r, w, b = torch.randn_like(x), torch.randn(hidden, device="cuda", dtype=dtype), torch.randn(hidden, device="cuda", dtype=dtype)
    eps = 1e-12

    def eager():
        h = x + r
        return F.layer_norm(h, (hidden,), w, b, eps), h

    run_case(
        benchmark, ceilings, op="residual_layer_norm[cuda]",
        cost=layer_norm_cost(ROWS, hidden, dtype, residual=True),
        kernel=lambda: native.bias_residual_layer_norm_cuda(x, None, r, w, b, eps),
        baselines={"triton": lambda: layer_norm_triton(x, w, b, eps, r), "eager": eager, "compile": compiled(eager)},
        shape={"rows": ROWS, "hidden": hidden}, dtype=dtype, target=row_op_target(hidden),
    )


@pytest.mark.parametrize("seq", [128, 512, 1024])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_scale_mask_softmax(benchmark, ceilings, dtype, seq):
    batch, heads = 8 * 1024 // seq * 4, 12  # about 4M scores per case
    scores = torch.randn(batch, heads, seq, seq, device="cuda", dtype=dtype)
    mask = torch.zeros(batch, seq, device="cuda")
    mask[:, seq // 2:] = float("-inf")
    scale = 0.125
    mask4 = mask[:, None, None, :]

    def eager():
        return torch.softmax(scores.float() * scale + mask4, dim=-1).to(dtype)

    run_case(
        benchmark, ceilings, op="scale_mask_softmax[cuda]",
        cost=softmax_cost(scores.numel() // seq, seq, dtype, mask_numel=mask.numel(), mask_dtype=torch.float32)
        + Cost(flops=scores.numel(), bytes=0),  # the scale multiply
        kernel=lambda: native.scale_mask_softmax_cuda(scores, mask, scale),
        baselines={"triton": lambda: softmax_triton(scores * scale, mask4), "eager": eager, "compile": compiled(eager)},
        shape={"batch": batch, "heads": heads, "seq": seq}, dtype=dtype, atol=2e-2,
    )


@pytest.mark.parametrize("hidden", [384, 768])
def test_remove_and_restore_padding(benchmark, ceilings, hidden):
    batch, seq = 64, 128
    lengths = torch.randint(1, seq + 1, (batch,), device="cuda")
    mask = (torch.arange(seq, device="cuda")[None] < lengths[:, None]).long()
    x = torch.randn(batch, seq, hidden, device="cuda", dtype=torch.float16)
    tokens = int(mask.sum())

    def cuda_round_trip():
        index, _, _ = native.pack_indices(mask)
        return native.scatter_rows(native.gather_rows(x, index), index, batch, seq)

    def eager():
        index = torch.nonzero(mask.reshape(-1)).reshape(-1)
        packed = x.reshape(batch * seq, hidden)[index]
        out = torch.zeros_like(x).reshape(batch * seq, hidden)
        out[index] = packed
        return out.reshape(batch, seq, hidden)

    moved = 2 * tokens * hidden * 2 + batch * seq * (8 + hidden * 2)  # gather r/w + scatter (zero fill) + mask
    run_case(
        benchmark, ceilings, op="pack_unpack[cuda]", cost=Cost(flops=0, bytes=moved),
        kernel=cuda_round_trip, baselines={"eager": eager},
        shape={"batch": batch, "seq": seq, "hidden": hidden, "tokens": tokens}, dtype=torch.float16, atol=0, rtol=0,
    )
