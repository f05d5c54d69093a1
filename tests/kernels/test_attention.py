"""kernels/attention.py: FlashAttention-style forward against a float64 reference.

The key guarantee: packed variable-length attention == padded attention with a key mask ==
the reference, on batches where every sequence has a different length.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kiln_kernels
from kiln_kernels.attention import (
    attention_cost,
    attention_reference,
    attention_triton,
    attention_varlen_cost,
    attention_varlen_reference,
    attention_varlen_triton,
)

# Against float64: fp32 runs full-precision dots; the half types round p before p @ v.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2.5e-2, 2.5e-2),
}


def _d(t):
    return t.double().cpu() if t is not None else None


def _qkv(b, sq, sk, hq, hkv, d, dtype, device):
    q = torch.randn(b, sq, hq, d).to(dtype).to(device)
    k = torch.randn(b, sk, hkv, d).to(dtype).to(device)
    v = torch.randn(b, sk, hkv, d).to(dtype).to(device)
    return q, k, v


def _close(assert_close, got, ref, dtype):
    atol, rtol = TOL[dtype]
    assert_close(got, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_padded_attention_matches_float64_reference(device, dtype, head_dim, causal, poisoned, assert_close):
    q, k, v = _qkv(2, 19, 19, 2, 2, head_dim, dtype, device)  # 19: two query/key blocks of 16
    out = poisoned(q.shape, dtype, device)
    assert attention_triton(q, k, v, None, causal, out=out) is out
    _close(assert_close, out, attention_reference(_d(q), _d(k), _d(v), None, causal), dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 37), (5, 33), (33, 7), (40, 40), (129, 129)])
def test_query_and_key_lengths_differ(device, sq, sk, causal, poisoned, assert_close):
    # (33, 7) causal: bottom-right alignment leaves the first 26 queries with no key -> zeros
    q, k, v = _qkv(1, sq, sk, 2, 2, 32, torch.float32, device)
    out = poisoned(q.shape, torch.float32, device)
    attention_triton(q, k, v, None, causal, out=out)
    _close(assert_close, out, attention_reference(_d(q), _d(k), _d(v), None, causal), torch.float32)
    if causal and sq > sk:
        assert (out[:, : sq - sk] == 0).all()


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_query_heads(device, dtype, hq, hkv, assert_close):
    q, k, v = _qkv(2, 17, 21, hq, hkv, 64, dtype, device)
    got = attention_triton(q, k, v, causal=True)
    _close(assert_close, got, attention_reference(_d(q), _d(k), _d(v), None, True), dtype)


@pytest.mark.parametrize("head_dim", [8, 80])
def test_head_dims_that_are_not_tuned_powers_of_two(device, head_dim, poisoned, assert_close):
    q, k, v = _qkv(1, 18, 18, 2, 1, head_dim, torch.float32, device)
    out = poisoned(q.shape, torch.float32, device)
    attention_triton(q, k, v, None, False, 0.3, out=out)
    _close(assert_close, out, attention_reference(_d(q), _d(k), _d(v), None, False, 0.3), torch.float32)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_padding_mask_including_a_fully_masked_sequence(device, dtype, causal, poisoned, assert_close):
    lengths = [33, 1, 0, 20]  # every length different, one sequence with no real key at all
    q, k, v = _qkv(4, 33, 33, 2, 2, 64, dtype, device)
    key_mask = torch.arange(33)[None, :] < torch.tensor(lengths)[:, None]
    out = poisoned(q.shape, dtype, device)
    attention_triton(q, k, v, key_mask.to(device), causal, out=out)
    ref = attention_reference(_d(q), _d(k), _d(v), key_mask, causal)
    _close(assert_close, out, ref, dtype)
    assert (out[2] == 0).all()


def test_padded_values_are_never_read(device, assert_close):
    # NaN in the padded keys/values must not leak: p = 0 there, but 0 * NaN would be NaN
    q, k, v = _qkv(2, 9, 21, 2, 2, 32, torch.float32, device)
    key_mask = torch.ones(2, 21, dtype=torch.bool)
    key_mask[0, 5:] = False
    k[0, 5:] = float("nan")
    v[0, 5:] = float("nan")
    got = attention_triton(q, k, v, key_mask.to(device))
    k[0, 5:] = 0
    v[0, 5:] = 0
    _close(assert_close, got, attention_reference(_d(q), _d(k), _d(v), key_mask), torch.float32)


def test_integer_key_mask_like_hugging_face(device, assert_close):
    q, k, v = _qkv(2, 6, 6, 2, 2, 32, torch.float32, device)
    attention_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], device=device)
    got = attention_triton(q, k, v, attention_mask)
    _close(assert_close, got, attention_reference(_d(q), _d(k), _d(v), attention_mask.cpu()), torch.float32)


def test_strided_bhsd_inputs_are_used_without_copies(device, assert_close):
    # [B, H, S, D] tensors (torch SDPA layout) passed as [B, S, H, D] views
    qh, kh, vh = (torch.randn(2, 3, 17, 32, device=device) for _ in range(3))
    q, k, v = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
    got = attention_triton(q, k, v)
    _close(assert_close, got, attention_reference(_d(q), _d(k), _d(v)), torch.float32)


def _pack(x, lengths):
    return torch.cat([x[i, :n] for i, n in enumerate(lengths)])


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packed_varlen_equals_padded_with_mask_equals_reference(device, dtype, causal, poisoned, assert_close):
    lengths = [1, 7, 16, 33, 2]  # all different: one token, sub-block, one block, > two blocks
    b, s = len(lengths), max(lengths)
    q, k, v = _qkv(b, s, s, 4, 2, 64, dtype, device)
    key_mask = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]).to(device)
    padded = attention_triton(q, k, v, key_mask, causal)

    cu = _cu(lengths, device)
    qp, kp, vp = _pack(q, lengths), _pack(k, lengths), _pack(v, lengths)
    out = poisoned(qp.shape, dtype, device)
    packed = attention_varlen_triton(qp, kp, vp, cu, cu, s, s, causal, out=out)
    ref = attention_varlen_reference(_d(qp), _d(kp), _d(vp), cu.cpu(), cu.cpu(), s, s, causal)

    _close(assert_close, packed, ref, dtype)
    _close(assert_close, _pack(padded, lengths), ref, dtype)
    # the padded reference agrees on every real query, which ties both to the plain definition
    padded_ref = attention_reference(_d(q), _d(k), _d(v), key_mask.cpu(), causal)
    assert_close(_pack(padded_ref, lengths), ref, torch.float32)


def test_varlen_with_different_query_and_key_lengths(device, poisoned, assert_close):
    # chunked prefill: each sequence brings a few new queries against a longer key history
    lq, lk = [3, 1, 5], [20, 1, 37]
    hq, d = 2, 32
    q = torch.randn(sum(lq), hq, d, device=device)
    k = torch.randn(sum(lk), 1, d, device=device)
    v = torch.randn(sum(lk), 1, d, device=device)
    cq, ck = _cu(lq, device), _cu(lk, device)
    out = poisoned(q.shape, torch.float32, device)
    attention_varlen_triton(q, k, v, cq, ck, max(lq), max(lk), True, out=out)
    ref = attention_varlen_reference(_d(q), _d(k), _d(v), cq.cpu(), ck.cpu(), max(lq), max(lk), True)
    _close(assert_close, out, ref, torch.float32)


def test_empty_sequences_in_a_packed_batch(device, assert_close):
    lengths = [4, 0, 3]
    q = torch.randn(7, 2, 32, device=device)
    cu = _cu(lengths, device)
    got = attention_varlen_triton(q, q, q, cu, cu, 4, 4)
    _close(assert_close, got, attention_varlen_reference(_d(q), _d(q), _d(q), cu.cpu(), cu.cpu(), 4, 4), torch.float32)


def test_bad_arguments_raise():
    q = torch.randn(1, 4, 3, 32)
    with pytest.raises(ValueError, match="multiple"):
        attention_triton(q, torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32))
    with pytest.raises(ValueError, match="key_mask"):
        attention_triton(q, q, q, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        attention_triton(q, q.half(), q.half())
    with pytest.raises(ValueError, match="share memory"):
        attention_triton(q, q, q, out=q)


def test_reference_equals_torch_sdpa(assert_close):
    q, k, v = _qkv(2, 12, 12, 4, 4, 32, torch.float64, "cpu")
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, 7:] = False
    sdpa = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask[:, None, None, :]
    ).transpose(1, 2)
    assert_close(attention_reference(q, k, v, key_mask), sdpa, torch.float32)
    sdpa_causal = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    assert_close(attention_reference(q, k, v, None, True), sdpa_causal, torch.float32)


def test_custom_ops_match_reference(op_device, assert_close):
    q, k, v = _qkv(2, 5, 5, 2, 1, 32, torch.float32, op_device)
    key_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool, device=op_device)
    got = torch.ops.kiln.attention(q, k, v, key_mask, True, None)
    assert got.device.type == op_device
    _close(assert_close, got, attention_reference(_d(q), _d(k), _d(v), key_mask.cpu(), True), torch.float32)
    cu = torch.tensor([0, 5, 7], dtype=torch.int32, device=op_device)
    qp, kp, vp = _pack(q, [5, 2]), _pack(k, [5, 2]), _pack(v, [5, 2])
    got = torch.ops.kiln.attention_varlen(qp, kp, vp, cu, cu, 5, 5, False, None)
    ref = _pack(attention_reference(_d(q), _d(k), _d(v), key_mask.cpu()), [5, 2])
    _close(assert_close, got, ref, torch.float32)


def test_opcheck_schema_fake_and_dispatch(op_device):
    q, k, v = _qkv(2, 5, 7, 4, 2, 32, torch.float32, op_device)
    key_mask = torch.ones(2, 7, dtype=torch.bool, device=op_device)
    key_mask[1, 3:] = False
    torch.library.opcheck(torch.ops.kiln.attention.default, (q, k, v, key_mask, False, None))
    torch.library.opcheck(torch.ops.kiln.attention.default, (q, k, v, None, True, 0.5))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=op_device)
    qp = torch.randn(8, 4, 32, device=op_device)
    kp = torch.randn(8, 2, 32, device=op_device)
    torch.library.opcheck(torch.ops.kiln.attention_varlen.default, (qp, kp, kp.clone(), cu, cu, 5, 5, True, None))


class _SelfAttention(torch.nn.Module):
    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = x.view(b, s, 2, 16)
        return torch.ops.kiln.attention(q, q, q, key_mask, False, None).reshape(b, s, 32)


class _PackedAttention(torch.nn.Module):
    def forward(self, x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        q = x.view(x.shape[0], 2, 16)
        return torch.ops.kiln.attention_varlen(q, q, q, cu, cu, 8, 8, True, 0.25).flatten(1)


def test_export_traces_through_the_ops(assert_close):
    x, mask = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.bool)
    ep = torch.export.export(_SelfAttention(), (x, mask))
    assert "kiln.attention.default" in {str(n.target) for n in ep.graph.nodes}
    assert_close(ep.module()(x, mask), _SelfAttention()(x, mask))
    xp, cu = torch.randn(11, 32), torch.tensor([0, 8, 11], dtype=torch.int32)
    ep = torch.export.export(_PackedAttention(), (xp, cu))
    assert "kiln.attention_varlen.default" in {str(n.target) for n in ep.graph.nodes}
    assert_close(ep.module()(xp, cu), _PackedAttention()(xp, cu))


def test_cost_model_counts_flops_and_bytes_by_hand():
    # BERT-base layer: B=8, S=384, 12 heads of 64, fp16, bool key mask
    c = attention_cost(8, 12, 384, 384, 64, torch.float16, key_mask_dtype=torch.bool)
    assert c.flops == 4 * 8 * 12 * 384 * 384 * 64
    assert c.bytes == 4 * 8 * 384 * 12 * 64 * 2 + 8 * 384
    # causal, Sq == Sk = 4: 1 + 2 + 3 + 4 = 10 visible pairs; GQA halves k/v bytes
    c = attention_cost(1, 8, 4, 4, 128, torch.bfloat16, heads_kv=4, causal=True)
    assert c.flops == 4 * 8 * 10 * 128
    assert c.bytes == 2 * 4 * 8 * 128 * 2 + 2 * 4 * 4 * 128 * 2
    # varlen: sequences of 3 and 5 tokens, non-causal: 9 + 25 pairs; cu_seqlens 2 x 3 int32
    c = attention_varlen_cost([3, 5], [3, 5], 2, 32, torch.float16)
    assert c.flops == 4 * 2 * 32 * (9 + 25)
    assert c.bytes == 4 * 8 * 2 * 32 * 2 + 2 * 3 * 4
    q = torch.randn(8, 2, 32).half()
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert kiln_kernels.op_cost("attention_varlen", q, q, q, cu, cu, 5, 5) == c
    assert math.isclose(c.intensity, c.flops / c.bytes)
