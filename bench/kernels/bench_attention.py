"""Attention forward against torch's scaled_dot_product_attention (flash backend on H100/A100)
and its torch.compile, padded and packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench.kernels.harness import compiled, run_case

from kiln_kernels.attention import attention_cost, attention_triton, attention_varlen_cost, attention_varlen_triton

TOKENS = 16384  # batch * seq fixed, as FlashAttention's benchmarks do
HIDDEN = 2048  # heads * head_dim


def _sdpa(q, k, v, causal, key_mask=None):
    mask = key_mask[:, None, None, :] if key_mask is not None else None
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal,
        enable_gqa=k.shape[2] != q.shape[2],
    ).transpose(1, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seq", [512, 1024, 2048, 4096, 8192, 16384])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention(benchmark, ceilings, dtype, head_dim, seq, causal):
    batch, heads = TOKENS // seq, HIDDEN // head_dim
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype) for _ in range(3))

    def eager():
        return _sdpa(q, k, v, causal)

    target = None
    if dtype == torch.bfloat16 and head_dim == 128 and seq >= 4096 and not causal:
        target = ("bf16, D=128, seq >= 4k, non-causal: >= 500 TFLOP/s", "tflop_per_s", 500.0)
    run_case(
        benchmark, ceilings,
        op="attention",
        cost=attention_cost(batch, heads, seq, seq, head_dim, dtype, causal=causal),
        kernel=lambda: attention_triton(q, k, v, None, causal),
        baselines={"eager": eager, "compile": compiled(eager)},
        shape={"batch": batch, "seq": seq, "heads": heads, "head_dim": head_dim, "causal": causal},
        dtype=dtype,
        target=target,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_attention_gqa_causal(benchmark, ceilings, dtype):
    batch, seq, hq, hkv, d = 4, 4096, 32, 8, 128  # Llama-3-8B prefill
    q = torch.randn(batch, seq, hq, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, seq, hkv, d, device="cuda", dtype=dtype) for _ in range(2))

    def eager():
        return _sdpa(q, k, v, True)

    run_case(
        benchmark, ceilings,
        op="attention",
        cost=attention_cost(batch, hq, seq, seq, d, dtype, heads_kv=hkv, causal=True),
        kernel=lambda: attention_triton(q, k, v, None, True),
        baselines={"eager": eager, "compile": compiled(eager)},
        shape={"batch": batch, "seq": seq, "heads_q": hq, "heads_kv": hkv, "head_dim": d, "causal": True},
        dtype=dtype,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention_bert_padded_vs_packed(benchmark, ceilings, dtype):
    """A BERT-base batch of 64 sequences of 16..384 tokens: packed varlen against SDPA on the
    padded batch with a key mask (what serving would run without packing)."""
    heads, d, s_max = 12, 64, 384
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, s_max + 1, (64,), generator=gen).tolist()
    b = len(lengths)
    q, k, v = (torch.randn(b, s_max, heads, d, device="cuda", dtype=dtype) for _ in range(3))
    key_mask = torch.arange(s_max, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    qp, kp, vp = (torch.cat([t[i, :n] for i, n in enumerate(lengths)]) for t in (q, k, v))

    def padded_sdpa():
        return _sdpa(q, k, v, False, key_mask)

    def packed_from_sdpa():  # SDPA's padded result, valid rows only, to compare against
        out = padded_sdpa()
        return torch.cat([out[i, :n] for i, n in enumerate(lengths)])

    run_case(
        benchmark, ceilings,
        op="attention_varlen",
        cost=attention_varlen_cost(lengths, lengths, heads, d, dtype),
        kernel=lambda: attention_varlen_triton(qp, kp, vp, cu, cu, s_max, s_max),
        baselines={"eager": packed_from_sdpa, "padded_sdpa": padded_sdpa,
                   "padded_kernel": lambda: attention_triton(q, k, v, key_mask)},
        shape={"batch": b, "max_seq": s_max, "tokens": sum(lengths), "heads": heads, "head_dim": d},
        dtype=dtype,
    )
