"""Rotary position embedding applied to q and k in one launch.

Rotary embedding rotates pairs of channels by a position-dependent angle. Eager PyTorch
builds ``rotate_half(x)``, multiplies by full-width cos/sin tensors and adds, for q and for k:
five kernels and as many intermediates. This kernel gathers the angles of each token's position
from a ``[max_positions, rotary_dim / 2]`` cos/sin cache and writes the rotated q and k once.

Two pairings of channels are in use:

* GPT-NeoX (Llama, Mistral, Pythia; ``interleaved=False``): channel ``i`` pairs with
  ``i + rotary_dim / 2`` ("rotate_half").
* GPT-J (GPT-J, CodeGen; ``interleaved=True``): channel ``2i`` pairs with ``2i + 1``.

Channels from ``rotary_dim`` to the head dim (partial rotary: Pythia, GPT-J) pass through.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kiln_kernels._util import FLOAT_DTYPES, check_dtype, check_launchable, compute_dtype, use_autotune
from kiln_kernels.cost import Cost, itemsize, register_cost

__all__ = [
    "rotary_embedding",
    "rotary_embedding_triton",
    "rotary_embedding_reference",
    "rotary_embedding_cost",
    "rotary_cos_sin",
]


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _rotate_heads(
    X, OUT, token, stride_xt, stride_xh, stride_xd, stride_ot, stride_oh,
    H, HEAD_DIM, cos, sin,
    HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    """Rotate all H heads of one token; `cos`/`sin` are the token's [BLOCK_HALF] angles."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (h < H)[:, None] & (d < HALF)[None, :]
    x_base = X + token * stride_xt + h[:, None] * stride_xh
    o_base = OUT + token * stride_ot + h[:, None] * stride_oh
    if INTERLEAVED:
        i1 = 2 * d
        i2 = 2 * d + 1
    else:
        i1 = d
        i2 = d + HALF
    x1 = tl.load(x_base + i1[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + i2[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(o_base + i1[None, :], o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_base + i2[None, :], o2.to(OUT.dtype.element_ty), mask=mask)
    if BLOCK_PASS > 0:  # partial rotary: copy channels [2 * HALF, HEAD_DIM) unchanged
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pmask = (h < H)[:, None] & (p < HEAD_DIM)[None, :]
        xp = tl.load(x_base + p[None, :] * stride_xd, mask=pmask, other=0.0)
        tl.store(o_base + p[None, :], xp.to(OUT.dtype.element_ty), mask=pmask)


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, POS, Q_OUT, K_OUT,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cos, stride_sin,
    HQ, HK, HEAD_DIM,
    HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    """One program per token: gather its angles once, rotate its q heads and k heads."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + token).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(COS + pos * stride_cos + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(SIN + pos * stride_sin + d, mask=d < HALF, other=0.0).to(tl.float32)
    _rotate_heads(Q, Q_OUT, token, stride_qt, stride_qh, stride_qd, stride_qot, stride_qoh,
                  HQ, HEAD_DIM, cos, sin, HALF, INTERLEAVED, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS)
    _rotate_heads(K, K_OUT, token, stride_kt, stride_kh, stride_kd, stride_kot, stride_koh,
                  HK, HEAD_DIM, cos, sin, HALF, INTERLEAVED, BLOCK_HK, BLOCK_HALF, BLOCK_PASS)


# One token per program moves (HQ + HK) * D elements, 4..40 KB at Llama sizes: 4 warps cover
# that in a few loads per thread; 8 warps help only with 64+ heads. The autotuner picks on GPU.
_CONFIGS = [triton.Config({}, num_warps=nw) for nw in (2, 4, 8)]
_rotary_tuned = triton.autotune(
    configs=_CONFIGS, key=["HQ", "HK", "HEAD_DIM", "HALF", "INTERLEAVED"]
)(_rotary_kernel)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _tokens(t: torch.Tensor) -> torch.Tensor:
    """View [..., H, D] as [T, H, D] without a copy when the leading dims allow."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def rotary_embedding_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool = False,
    *,
    q_out: Optional[torch.Tensor] = None,
    k_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by the angles of each token's position, with the Triton kernel.

    Args:
        q: [..., Hq, D] fp32/fp16/bf16; the leading dims (e.g. [B, S] or packed [T]) index
            tokens. Any strides (q may be a slice of a fused qkv projection).
        k: [..., Hk, D] with the same leading dims and dtype as ``q``.
        cos, sin: [max_positions, rotary_dim / 2] angle caches (see :func:`rotary_cos_sin`),
            ``rotary_dim <= D`` and even.
        positions: integer tensor shaped like the leading dims: each token's position,
            ``0 <= position < max_positions`` (not checked: that would sync the GPU).
        interleaved: False for GPT-NeoX pairing (i, i + rotary_dim/2), True for GPT-J (2i, 2i+1).
        q_out, k_out: optional contiguous output buffers shaped and typed like ``q``/``k``;
            passing ``q``/``k`` themselves (if contiguous) rotates in place.

    Returns:
        ``(q_rot, k_rot)``, contiguous.

    Raises:
        TypeError, ValueError: dtype or shape mismatches.
        RuntimeError: tensors the current Triton mode cannot launch on.
    """
    check_dtype("q", q, FLOAT_DTYPES)
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype}, q has {q.dtype}; they must match")
    if q.dim() < 2 or k.dim() != q.dim() or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [..., H, D] with "
                         "the same leading dims and head dim")
    head_dim = q.shape[-1]
    half = cos.shape[-1]
    if cos.dim() != 2 or sin.shape != cos.shape or not 0 < 2 * half <= head_dim:
        raise ValueError(f"cos and sin must both be [max_positions, rotary_dim / 2] with "
                         f"rotary_dim <= head dim {head_dim}; got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if positions.shape != q.shape[:-2] or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 of shape {tuple(q.shape[:-2])}")
    check_launchable(q, k, cos, sin, positions, q_out, k_out)
    for name, buf, like in (("q_out", q_out, q), ("k_out", k_out, k)):
        if buf is not None and (buf.shape != like.shape or buf.dtype != like.dtype or not buf.is_contiguous()):
            raise ValueError(f"{name} must be contiguous with the shape and dtype of {name[0]}")
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out

    q3, k3 = _tokens(q), _tokens(k)
    qo3, ko3 = _tokens(q_out), _tokens(k_out)
    pos = positions.reshape(-1).contiguous()
    cos2 = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin2 = sin if sin.stride(-1) == 1 else sin.contiguous()
    n_tokens = q3.shape[0]
    rest = head_dim - 2 * half
    args = (
        q3, k3, cos2, sin2, pos, qo3, ko3,
        q3.stride(0), q3.stride(1), q3.stride(2),
        k3.stride(0), k3.stride(1), k3.stride(2),
        qo3.stride(0), qo3.stride(1), ko3.stride(0), ko3.stride(1),
        cos2.stride(0), sin2.stride(0),
        q3.shape[1], k3.shape[1], head_dim,
    )
    meta = dict(
        HALF=half, INTERLEAVED=interleaved,
        BLOCK_HQ=triton.next_power_of_2(q3.shape[1]), BLOCK_HK=triton.next_power_of_2(k3.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_PASS=triton.next_power_of_2(rest) if rest > 0 else 0,
    )
    # In-place calls must not be autotuned: every timed config would rotate again.
    in_place = q_out.data_ptr() == q.data_ptr() or k_out.data_ptr() == k.data_ptr()
    if use_autotune(q) and not in_place:
        _rotary_tuned[(n_tokens,)](*args, **meta)
    else:
        _rotary_kernel[(n_tokens,)](*args, **meta, num_warps=4)
    return q_out, k_out


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("kiln::rotary_embedding", mutates_args=())
def rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [..., Hq, D] and k [..., Hk, D] at ``positions``, angles from
    ``cos``/``sin`` [max_positions, rotary_dim / 2]; ``interleaved`` selects the GPT-J
    pairing. Returns new contiguous (q, k). CPU runs the reference, CUDA Triton."""
    return rotary_embedding_reference(q, k, cos, sin, positions, interleaved)


@rotary_embedding.register_kernel("cuda")
def _rotary_embedding_cuda(q, k, cos, sin, positions, interleaved=False):
    return rotary_embedding_triton(q, k, cos, sin, positions, interleaved)


@rotary_embedding.register_fake
def _rotary_embedding_fake(q, k, cos, sin, positions, interleaved=False):
    return q.new_empty(q.shape), k.new_empty(k.shape)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def rotary_cos_sin(
    max_positions: int,
    rotary_dim: int,
    base: float = 10000.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard angle caches: ``angle[p, i] = p * base ** (-2i / rotary_dim)``; returns
    ``(cos, sin)``, each [max_positions, rotary_dim / 2]. Computed in float64, so the cache is
    as exact as ``dtype`` allows even for positions in the hundreds of thousands."""
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def rotary_embedding_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch rotary embedding with the kernel's semantics (fp32 math, float64 stays
    float64, one rounding to the input dtype)."""
    c = compute_dtype(q.dtype)
    half = cos.shape[-1]
    cs = cos[positions.long()].to(c).unsqueeze(-2)  # [..., 1, half], broadcast over heads
    sn = sin[positions.long()].to(c).unsqueeze(-2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xr = x[..., : 2 * half].to(c)
        if interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
        else:
            x1, x2 = xr[..., :half], xr[..., half:]
        o1, o2 = x1 * cs - x2 * sn, x2 * cs + x1 * sn
        rot = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
        return torch.cat((rot.to(x.dtype), x[..., 2 * half:]), dim=-1).contiguous()

    return rotate(q), rotate(k)


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------
def rotary_embedding_cost(
    num_tokens: int,
    heads_q: int,
    heads_k: int,
    head_dim: int,
    rotary_dim: int,
    dtype: torch.dtype,
    *,
    cache_dtype: torch.dtype = torch.float32,
    position_dtype: torch.dtype = torch.int64,
) -> Cost:
    """FLOPs and minimum bytes of rotating q and k.

    FLOPs: 3 per rotated channel (two products and a sum), ``rotary_dim`` channels per head.
    Bytes: read and write q and k in full (pass-through channels are copied), read each token's
    position and its ``rotary_dim / 2`` cos and sin values.
    """
    heads = heads_q + heads_k
    flops = 3 * num_tokens * heads * rotary_dim
    nbytes = (2 * num_tokens * heads * head_dim * itemsize(dtype)
              + num_tokens * rotary_dim * itemsize(cache_dtype)
              + num_tokens * itemsize(position_dtype))
    return Cost(flops=flops, bytes=nbytes)


def _cost_from_args(q, k, cos, sin, positions, interleaved=False) -> Cost:
    return rotary_embedding_cost(
        positions.numel(), q.shape[-2], k.shape[-2], q.shape[-1], 2 * cos.shape[-1], q.dtype,
        cache_dtype=cos.dtype, position_dtype=positions.dtype,
    )


register_cost("rotary_embedding", rotary_embedding_cost, _cost_from_args)
