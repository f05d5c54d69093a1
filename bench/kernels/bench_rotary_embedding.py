"""Rotary embedding on q and k against torch eager (Hugging Face formulation) and torch.compile."""

from __future__ import annotations

import pytest
import torch
from bench.kernels.harness import compiled, run_case

from kiln_kernels.rotary_embedding import rotary_cos_sin, rotary_embedding_cost, rotary_embedding_triton

# (tokens, q heads, kv heads, head dim): Llama-2-7B (MHA), Llama-3-8B (GQA)
SHAPES = [(8192, 32, 32, 128), (8192, 32, 8, 128), (1024, 32, 8, 128)]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rotary_embedding(benchmark, ceilings, dtype, shape):
    t, hq, hk, d = shape
    q = torch.randn(t, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(t, hk, d, device="cuda", dtype=dtype)
    cos, sin = rotary_cos_sin(8192, d, device="cuda")
    pos = torch.arange(t, device="cuda") % 8192

    def eager():
        c = torch.cat((cos, cos), -1)[pos].unsqueeze(1)
        s = torch.cat((sin, sin), -1)[pos].unsqueeze(1)
        qf, kf = q.float(), k.float()
        return ((qf * c + _rotate_half(qf) * s).to(dtype), (kf * c + _rotate_half(kf) * s).to(dtype))

    run_case(
        benchmark, ceilings,
        op="rotary_embedding",
        cost=rotary_embedding_cost(t, hq, hk, d, d, dtype),
        kernel=lambda: rotary_embedding_triton(q, k, cos, sin, pos),
        baselines={"eager": eager, "compile": compiled(eager)},
        shape={"tokens": t, "heads_q": hq, "heads_kv": hk, "head_dim": d},
        dtype=dtype,
        target=("memory-bound: >= 90% of measured copy bandwidth", "frac_copy_bw", 0.9),
    )
