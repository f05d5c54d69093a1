"""Attention forward with FlashAttention's online softmax: the S x S score matrix never exists.

Each program owns BLOCK_M queries of one head and walks the keys BLOCK_N at a time, keeping a
running row max ``m``, row sum ``l`` and un-normalized output ``acc`` in registers
(FlashAttention-2, Dao 2023). Memory traffic is q, k, v and o once each, so long sequences are
compute-bound instead of bound by writing and re-reading ``softmax(q k^T)``.

Two entry points share one kernel:

* :func:`attention` — padded batches ``[B, S, H, D]`` with an optional key-padding mask.
* :func:`attention_varlen` — packed batches ``[total_tokens, H, D]`` described by cumulative
  sequence lengths ``cu_seqlens`` (as flash-attn's ``varlen`` API); padding is neither stored
  nor computed.

Both support causal masking, grouped-query attention (``Hq`` a multiple of ``Hkv``), head dims
up to 256 (32, 64, 128 are the tuned ones; others are padded to a power of two), and fp32,
fp16 and bf16. Conventions, the same in kernel and reference:

* Causal masking is aligned to the bottom-right corner, as flash-attn >= 2.1: query ``i`` sees
  key ``j`` iff ``j <= i + Sk - Sq``. With ``Sq == Sk`` that is ordinary causal masking; with a
  shorter query block (decoding with a KV cache) the queries are the *last* positions.
* A query that sees no key at all (every key masked) gets an output of zeros, not NaN.
* ``key_mask`` is True (or nonzero) for real keys, like Hugging Face's ``attention_mask`` — the
  opposite of ``nn.MultiheadAttention``'s ``key_padding_mask``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from kiln_kernels._util import (
    FLOAT_DTYPES,
    check_dtype,
    check_launchable,
    compute_dtype,
    dot_dtype,
    shares_storage,
    use_autotune,
)
from kiln_kernels.cost import Cost, itemsize, register_cost

__all__ = [
    "attention",
    "attention_varlen",
    "attention_triton",
    "attention_varlen_triton",
    "attention_reference",
    "attention_varlen_reference",
    "attention_cost",
    "attention_varlen_cost",
]

_LOG2E = 1.4426950408889634  # the kernel works in base 2: exp(x) = exp2(x * log2(e))
_MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _load(ptrs, row_mask, d_mask, CHECK_ROWS: tl.constexpr, CHECK_D: tl.constexpr):
    """Load a tile, masking only what may be out of range (unmasked loads vectorize best)."""
    if CHECK_ROWS:
        if CHECK_D:
            x = tl.load(ptrs, mask=row_mask & d_mask, other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask, other=0.0)
    else:
        if CHECK_D:
            x = tl.load(ptrs, mask=d_mask, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _attn_inner(
    acc, l_i, m_i, q,
    k_base, v_base, km_base,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_ms,
    offs_m, offs_n, offs_d, lo, hi, k_len, causal_shift, qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update over key blocks [lo, hi). MASKED blocks may run past k_len or
    cross the causal diagonal; unmasked blocks are fully visible to every query row."""
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_bounds = cols < k_len
        k = _load(k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_ks,
                  in_bounds[None, :], d_mask[:, None], MASKED, PAD_D)
        s = tl.dot(q, k.to(DOT_DTYPE), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            valid = in_bounds[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + causal_shift)
            s = tl.where(valid, s, float("-inf"))
        if HAS_KEY_MASK:
            km = tl.load(km_base + cols * stride_ms, mask=in_bounds, other=0) != 0
            s = tl.where(km[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no visible key keep m = -inf; shifting them by 0 instead keeps
        # exp2(-inf - -inf) = NaN out: their p and alpha are exactly 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd
        if HAS_KEY_MASK:
            # padded keys' values are not read: p = 0 there, but 0 * NaN garbage would be NaN
            v = _load(v_ptrs, (in_bounds & km)[:, None], d_mask[None, :], True, PAD_D)
        else:
            v = _load(v_ptrs, in_bounds[:, None], d_mask[None, :], MASKED, PAD_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, KEY_MASK, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_mb, stride_ms,
    seqlen_q, seqlen_k,  # padded lengths; per-sequence lengths come from CU_Q/CU_K if VARLEN
    group_size,  # query heads per key/value head (GQA)
    qk_scale,  # softmax scale * log2(e)
    SEQ_BUCKET,  # autotune key only: next power of two of the longest query sequence
    HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid: (query blocks of the longest sequence, query heads, batch)."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    if VARLEN:
        # packed: sequence b is rows CU[b]:CU[b + 1] of a single batch entry
        q_start = tl.load(CU_Q + off_b).to(tl.int64)
        q_len = (tl.load(CU_Q + off_b + 1) - q_start).to(tl.int32)
        k_start = tl.load(CU_K + off_b).to(tl.int64)
        k_len = (tl.load(CU_K + off_b + 1) - k_start).to(tl.int32)
        q_off = q_start * stride_qs
        k_off = k_start * stride_ks
        v_off = k_start * stride_vs
        o_off = q_start * stride_os
    else:
        q_len = seqlen_q
        k_len = seqlen_k
        q_off = off_b * stride_qb
        k_off = off_b * stride_kb
        v_off = off_b * stride_vb
        o_off = off_b * stride_ob
    if start_m * BLOCK_M >= q_len:  # this sequence is shorter than the longest one
        return

    off_kvh = (off_h // group_size).to(tl.int64)
    off_h = off_h.to(tl.int64)
    q_base = Q + q_off + off_h * stride_qh
    k_base = K + k_off + off_kvh * stride_kh
    v_base = V + v_off + off_kvh * stride_vh
    o_base = O + o_off + off_h * stride_oh
    km_base = KEY_MASK + off_b * stride_mb

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q = _load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
              m_in[:, None], d_mask[None, :], True, PAD_D).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys [0, full) are visible to every row of this block and in range: no masks there.
    # Keys [full, hi) need the bounds/causal masks. Bottom-right causal: row i sees j <= i + shift.
    causal_shift = k_len - q_len
    if CAUSAL:
        hi = tl.maximum(tl.minimum(k_len, (start_m + 1) * BLOCK_M + causal_shift), 0)
        full = tl.maximum(tl.minimum(k_len, start_m * BLOCK_M + causal_shift + 1), 0)
    else:
        hi = k_len
        full = k_len
    full = (full // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q, k_base, v_base, km_base,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ms,
        offs_m, offs_n, offs_d, 0, full, k_len, causal_shift, qk_scale,
        False, CAUSAL, HAS_KEY_MASK, HEAD_DIM, PAD_D, BLOCK_N, DOT_DTYPE, DOT_PRECISION,
    )
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q, k_base, v_base, km_base,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ms,
        offs_m, offs_n, offs_d, full, hi, k_len, causal_shift, qk_scale,
        True, CAUSAL, HAS_KEY_MASK, HEAD_DIM, PAD_D, BLOCK_N, DOT_DTYPE, DOT_PRECISION,
    )
    # l == 0 only where no key was visible; acc is 0 there too, so the row comes out 0.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    if PAD_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_in[:, None] & d_mask[None, :])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_in[:, None])


def _prune_configs(configs, named_args, **kwargs):
    """Keep tiles that fit: no BLOCK_M taller than the (bucketed) sequence, 8 warps only on
    tiles of 128 x 128 or more (the Triton fused-attention tutorial's rule: fewer rows per warp
    starve the tensor cores), and a shared-memory estimate under the device's limit
    (227 KB on H100, 163 KB on A100, 99 KB on consumer Ampere)."""
    args = {**named_args, **kwargs}
    block_d = args["BLOCK_D"]
    es = args["Q"].element_size()
    props = torch.cuda.get_device_properties(args["Q"].device)
    limit = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm > max(64, args["SEQ_BUCKET"]):
            continue
        if c.num_warps == 8 and bm * bn < 128 * 128:
            continue
        # q tile once, k and v tiles per pipeline stage
        if (bm * block_d + 2 * c.num_stages * bn * block_d) * es > limit:
            continue
        kept.append(c)
    return kept or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_stages=2, num_warps=4)]


# The Triton fused-attention tutorial's search space (python/tutorials/06-fused-attention.py):
# on H100 its best forward configs for D = 64/128 are 128 x 128 tiles, 8 warps, 3-4 stages; on
# A100, 128 x 64 with 4 warps, 3 stages. ptxas -v for sm_90 (Triton 3.9, bf16, D = 128): 128 x
# 128 at 8 warps spills 408 bytes, 128 x 64 at 8 warps 4 bytes; D = 64 at 128 x 128 none. The
# autotuner chooses on the device; run times are not yet measured (issue 3).
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
    for bm in (64, 128)
    for bn in (32, 64, 128)
    for s in (2, 3, 4)
    for w in (4, 8)
]
_attention_fwd_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["SEQ_BUCKET", "HEAD_DIM", "VARLEN", "CAUSAL", "HAS_KEY_MASK"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attention_fwd_kernel)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
# Interpreter tile: tl.dot's minimum of 16; small, so short test sequences span several
# query and key blocks and both the unmasked and the masked loops run.
_INTERPRET_META = dict(BLOCK_M=16, BLOCK_N=16)
_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int) -> None:
    check_dtype("q", q, FLOAT_DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    layout = "[B, S, H, D]" if rank == 4 else "[total_tokens, H, D]"
    if q.dim() != rank or k.dim() != rank or v.shape != k.shape:
        raise ValueError(f"q, k, v must be {layout} with v shaped like k; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if not 0 < q.shape[-1] <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{_MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of key/value heads "
                         f"({k.shape[-2]})")


def _launch(
    q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, o4: torch.Tensor,
    key_mask: Optional[torch.Tensor], cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor],
    batch: int, seqlen_q: int, seqlen_k: int, causal: bool, sm_scale: Optional[float],
) -> None:
    """Launch on 4-d [B, S, H, D] views (batch stride 0 and cu_seqlens for varlen)."""
    head_dim = q4.shape[-1]
    hq, hkv = q4.shape[2], k4.shape[2]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    mask_arg = key_mask if key_mask is not None else q4
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)
    args = (
        q4, k4, v4, o4, mask_arg,
        cu_q if cu_q is not None else q4, cu_k if cu_k is not None else q4,
        *q4.stride(), *k4.stride(), *v4.stride(), *o4.stride(), *mask_strides,
        seqlen_q, seqlen_k, hq // hkv, scale * _LOG2E, triton.next_power_of_2(max(seqlen_q, 1)),
    )
    meta = dict(
        HEAD_DIM=head_dim, VARLEN=cu_q is not None, CAUSAL=causal, HAS_KEY_MASK=key_mask is not None,
        PAD_D=block_d != head_dim, DOT_DTYPE=dot_dtype(q4.dtype),
        DOT_PRECISION="ieee" if q4.dtype == torch.float32 else "tf32", BLOCK_D=block_d,
    )
    if use_autotune(q4):
        grid = lambda META: (triton.cdiv(seqlen_q, META["BLOCK_M"]), hq, batch)  # noqa: E731
        _attention_fwd_tuned[grid](*args, **meta)
    else:
        grid = (triton.cdiv(seqlen_q, _INTERPRET_META["BLOCK_M"]), hq, batch)
        _attention_fwd_kernel[grid](*args, **meta, **_INTERPRET_META, num_warps=4)


def _check_out(out: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, dtype and device")
    if any(shares_storage(out, t) for t in (q, k, v)):
        raise ValueError("out must not share memory with q, k or v (other programs still read them)")
    return out


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    sm_scale: Optional[float] = None,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention over padded batches with the Triton kernel.

    Args:
        q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D] with ``Hq % Hkv == 0``; fp32/fp16/bf16, any
            strides (a [B, H, S, D] tensor's ``.transpose(1, 2)`` is taken as is, no copy).
        key_mask: optional [B, Sk] bool or integer, True/nonzero for real keys.
        causal: bottom-right aligned causal mask (see the module docstring).
        sm_scale: softmax scale; default ``1 / sqrt(D)``.
        out: optional [B, Sq, Hq, D] output buffer (any strides).

    Returns:
        [B, Sq, Hq, D] in q's dtype; queries that see no key are zeros.

    Raises:
        TypeError, ValueError: dtypes or shapes that do not fit.
        RuntimeError: tensors the current Triton mode cannot launch on.
    """
    _check_qkv(q, k, v, rank=4)
    b, sq, _, _ = q.shape
    sk = k.shape[1]
    if k.shape[0] != b:
        raise ValueError(f"q has batch {b}, k has {k.shape[0]}")
    if key_mask is not None:
        if key_mask.shape != (b, sk) or key_mask.dtype not in _MASK_DTYPES:
            raise ValueError(f"key_mask must be bool or integer [{b}, {sk}], got "
                             f"{key_mask.dtype} {tuple(key_mask.shape)}")
        if key_mask.dtype == torch.bool:
            key_mask = key_mask.view(torch.uint8)  # same bytes; pointer type Triton loads
    check_launchable(q, k, v, key_mask, out)
    out = _check_out(out, q, k, v)
    if out.numel() == 0:
        return out
    if sk == 0:
        return out.zero_()
    _launch(q, k, v, out, key_mask, None, None, b, sq, sk, causal, sm_scale)
    return out


def attention_varlen_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    sm_scale: Optional[float] = None,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention over packed variable-length batches with the Triton kernel.

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hkv, D]; sequences stored back to back.
        cu_seqlens_q, cu_seqlens_k: int32/int64 [B + 1], starting at 0: sequence ``b`` is
            rows ``cu[b]:cu[b + 1]``. Values are trusted (reading them would sync the GPU);
            output rows past ``cu_seqlens_q[-1]`` are left unwritten.
        max_seqlen_q, max_seqlen_k: the longest query/key sequence; sizes the grid, so a
            smaller value than the truth silently skips queries.
        causal, sm_scale, out: as in :func:`attention_triton`; causal alignment is per sequence.

    Returns:
        [total_q, Hq, D] in q's dtype.

    Raises:
        TypeError, ValueError: dtypes or shapes that do not fit.
        RuntimeError: tensors the current Triton mode cannot launch on.
    """
    _check_qkv(q, k, v, rank=3)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a 1-d int32/int64 tensor, got {cu.dtype} {tuple(cu.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() < 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both have B + 1 >= 1 entries")
    check_launchable(q, k, v, cu_seqlens_q, cu_seqlens_k, out)
    out = _check_out(out, q, k, v)
    batch = cu_seqlens_q.numel() - 1
    if out.numel() == 0 or batch == 0 or max_seqlen_q <= 0:
        return out
    if max_seqlen_k <= 0:
        return out.zero_()
    _launch(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), out.unsqueeze(0), None,
            cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), batch,
            max_seqlen_q, max_seqlen_k, causal, sm_scale)
    return out


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("kiln::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    causal: bool = False,
    sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention over padded [B, S, H, D] batches; ``key_mask`` [B, Sk] True for real keys;
    bottom-right causal; GQA. CPU runs the reference, CUDA Triton."""
    return attention_reference(q, k, v, key_mask, causal, sm_scale)


@attention.register_kernel("cuda")
def _attention_cuda(q, k, v, key_mask, causal=False, sm_scale=None):
    return attention_triton(q, k, v, key_mask, causal, sm_scale)


@attention.register_fake
def _attention_fake(q, k, v, key_mask, causal=False, sm_scale=None):
    return q.new_empty(q.shape)


@torch.library.custom_op("kiln::attention_varlen", mutates_args=())
def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention over packed [total_tokens, H, D] batches delimited by ``cu_seqlens``.
    CPU runs the reference, CUDA Triton."""
    return attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, causal, sm_scale)


@attention_varlen.register_kernel("cuda")
def _attention_varlen_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=False, sm_scale=None):
    return attention_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, causal, sm_scale)


@attention_varlen.register_fake
def _attention_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=False, sm_scale=None):
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """Plain-torch attention on [B, S, H, D] with the kernel's conventions (bottom-right
    causal, zeros for queries that see no key), computed in fp32 (float64 stays float64)."""
    c = compute_dtype(q.dtype)
    _, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    kk = k.to(c).repeat_interleave(hq // hkv, dim=2)
    vv = v.to(c).repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(c), kk) * scale
    valid = torch.ones(sq, sk, dtype=torch.bool, device=q.device)[None, None]
    if causal:
        rows = torch.arange(sq, device=q.device)[:, None]
        cols = torch.arange(sk, device=q.device)[None, :]
        valid = valid & (cols <= rows + (sk - sq))[None, None]
    if key_mask is not None:
        valid = valid & (key_mask != 0)[:, None, None, :]
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(valid.any(dim=-1, keepdim=True), p, torch.zeros_like(p))
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    return out.to(q.dtype).contiguous()


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """Packed attention by running :func:`attention_reference` on each sequence.
    ``max_seqlen_*`` are accepted for signature parity and not needed here."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe > qs:
            out[qs:qe] = attention_reference(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke],
                                             None, causal, sm_scale)[0]
    return out


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------
def _visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """(query, key) pairs attended: all of them, or under bottom-right causal masking
    sum over i of clamp(i + Sk - Sq + 1, 0, Sk)."""
    if not causal:
        return seqlen_q * seqlen_k
    shift = seqlen_k - seqlen_q
    return sum(min(seqlen_k, max(0, i + shift + 1)) for i in range(seqlen_q))


def attention_cost(
    batch: int,
    heads_q: int,
    seqlen_q: int,
    seqlen_k: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    heads_kv: Optional[int] = None,
    causal: bool = False,
    key_mask_dtype: Optional[torch.dtype] = None,
) -> Cost:
    """FLOPs and minimum bytes of padded attention.

    FLOPs: the two matmuls, ``4 * D`` per visible (query, key) pair per query head — the
    convention FlashAttention's TFLOP/s figures use (softmax arithmetic is not counted; a
    causal mask halves the work). Padded keys count: the kernel computes them.
    Bytes: q and o ``[B, Sq, Hq, D]``, k and v ``[B, Sk, Hkv, D]``, the key mask if any.
    """
    hkv = heads_kv or heads_q
    flops = 4 * batch * heads_q * head_dim * _visible_pairs(seqlen_q, seqlen_k, causal)
    es = itemsize(dtype)
    nbytes = 2 * batch * seqlen_q * heads_q * head_dim * es + 2 * batch * seqlen_k * hkv * head_dim * es
    if key_mask_dtype is not None:
        nbytes += batch * seqlen_k * itemsize(key_mask_dtype)
    return Cost(flops=flops, bytes=nbytes)


def attention_varlen_cost(
    seqlens_q: Sequence[int],
    seqlens_k: Sequence[int],
    heads_q: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    heads_kv: Optional[int] = None,
    causal: bool = False,
) -> Cost:
    """FLOPs and minimum bytes of packed attention over sequences of the given lengths:
    :func:`attention_cost` summed per sequence, plus the two ``cu_seqlens`` (int32) reads."""
    total = Cost(flops=0, bytes=8 * (len(seqlens_q) + 1))
    for sq, sk in zip(seqlens_q, seqlens_k, strict=True):
        total = total + attention_cost(1, heads_q, sq, sk, head_dim, dtype, heads_kv=heads_kv, causal=causal)
    return total


def _cost_from_args(q, k, v, key_mask, causal=False, sm_scale=None) -> Cost:
    b, sq, hq, d = q.shape
    return attention_cost(b, hq, sq, k.shape[1], d, q.dtype, heads_kv=k.shape[2], causal=causal,
                          key_mask_dtype=key_mask.dtype if key_mask is not None else None)


def _varlen_cost_from_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=False, sm_scale=None) -> Cost:
    """Exact when cu_seqlens hold real values; for fake/meta tensors (graph walks before
    running) an upper bound: every query sees ``max_seqlen_k`` keys."""
    try:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    except Exception:  # fake or meta tensors carry no values
        hq, d = q.shape[1], q.shape[2]
        flops = 4 * hq * d * q.shape[0] * max_seqlen_k
        es = itemsize(q.dtype)
        nbytes = 2 * q.numel() * es + 2 * k.numel() * es + 2 * cu_seqlens_q.numel() * 4
        return Cost(flops=flops, bytes=nbytes)
    lq = [cq[i + 1] - cq[i] for i in range(len(cq) - 1)]
    lk = [ck[i + 1] - ck[i] for i in range(len(ck) - 1)]
    return attention_varlen_cost(lq, lk, q.shape[1], q.shape[2], q.dtype, heads_kv=k.shape[1], causal=causal)


register_cost("attention", attention_cost, _cost_from_args)
register_cost("attention_varlen", attention_varlen_cost, _varlen_cost_from_args)
