"""Softmax over the last dimension with an optional additive mask.

Eager attention computes ``softmax(scores + mask)`` as two kernels with a full-size
intermediate; this reads the scores and the (usually broadcast, much smaller) mask once and
writes the probabilities once. Rows that fit registers (up to 16k elements) are read once;
wider rows are walked twice with an online max/sum. A row whose every logit is ``-inf``
(a fully masked query) yields zeros, where ``torch.softmax`` yields NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kiln_kernels._util import (
    FLOAT_DTYPES,
    check_dtype,
    check_launchable,
    compute_dtype,
    launch_rows,
    row_autotune,
    row_block_n,
    shares_storage,
)
from kiln_kernels.cost import Cost, itemsize, register_cost

__all__ = ["softmax", "softmax_triton", "softmax_reference", "softmax_cost"]


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _softmax_fwd_kernel(
    X, MASK, Y,
    M, N,
    stride_x, stride_y,
    D1, D2,  # the rows are [D0, D1, D2] flattened; the mask is indexed by those three
    stride_m0, stride_m1, stride_m2, stride_mn,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x_row = X + rows[:, None] * stride_x
    y_row = Y + rows[:, None] * stride_y
    # Broadcast masks (BERT's [B, 1, 1, S] against scores [B, H, S, S]) carry stride 0 on the
    # broadcast dims, so the mask row is found from the row's 3-d index, never materialized.
    i2 = rows % D2
    i1 = (rows // D2) % D1
    i0 = rows // (D2 * D1)
    m_row = MASK + (i0 * stride_m0 + i1 * stride_m1 + i2 * stride_m2)[:, None]

    if SINGLE_TILE:
        mask = row_mask[:, None] & (cols[None, :] < N)
        x = tl.load(x_row + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_MASK:
            x += tl.load(m_row + cols[None, :] * stride_mn, mask=mask, other=0.0).to(tl.float32)
        row_max = tl.max(x, axis=1)
        # a fully masked row has max -inf; shifting by 0 keeps exp(-inf) = 0 instead of NaN
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        e = tl.exp(x - row_max[:, None])
        denom = tl.sum(e, axis=1)
        # a fully masked row has e == 0 everywhere: dividing by 1 instead of 0 leaves it 0
        inv = 1.0 / tl.where(denom > 0.0, denom, 1.0)
        tl.store(y_row + cols[None, :], (e * inv[:, None]).to(Y.dtype.element_ty), mask=mask)
    else:
        # Online pass: per-lane running max and rescaled sum, merged across lanes at the end.
        lane_max = tl.full([BLOCK_M, BLOCK_N], float("-inf"), dtype=tl.float32)
        lane_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = tl.load(x_row + c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_MASK:
                x += tl.load(m_row + c[None, :] * stride_mn, mask=mask, other=0.0).to(tl.float32)
            new_max = tl.maximum(lane_max, x)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.exp(x - safe)
            lane_max = new_max
        row_max = tl.max(lane_max, axis=1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        denom = tl.sum(lane_sum * tl.exp(lane_max - row_max[:, None]), axis=1)
        inv = 1.0 / tl.where(denom > 0.0, denom, 1.0)  # fully masked rows: exp terms are 0
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = tl.load(x_row + c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_MASK:
                x += tl.load(m_row + c[None, :] * stride_mn, mask=mask, other=0.0).to(tl.float32)
            y = tl.exp(x - row_max[:, None]) * inv[:, None]
            tl.store(y_row + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


# Tile search space and pruning shared by the row kernels: kernels/_util.py.
_softmax_fwd_tuned = row_autotune(_softmax_fwd_kernel, key=["BLOCK_N", "HAS_MASK", "SINGLE_TILE"])


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
# Rows up to MAX_FUSED_N elements (64 KB of fp32) stay in registers and are read once; wider
# rows are read twice in LOOP_BLOCK_N-element chunks (`_util.row_block_n`).


def softmax_triton(
    x: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """``softmax(x + mask, dim=-1)`` with the Triton kernel, computed in fp32.

    Args:
        x: [..., N] fp32/fp16/bf16 logits.
        mask: optional additive float mask broadcastable to ``x`` (``-inf`` or a large
            negative value where masked); read through its strides, never expanded.
        out: optional contiguous output buffer shaped and typed like ``x`` (``x`` itself
            for an in-place softmax).
        block_n: force the column tile (power of two); below N selects the two-pass path.

    Returns:
        Probabilities shaped and typed like ``x``; rows with every logit ``-inf`` are zeros.

    Raises:
        TypeError: unsupported dtype (a boolean mask must be turned into an additive one).
        ValueError: mask not broadcastable, or a bad ``out``.
        RuntimeError: tensors the current Triton mode cannot launch on.
    """
    check_dtype("x", x, FLOAT_DTYPES)
    if mask is not None:
        check_dtype("mask", mask, FLOAT_DTYPES)
    check_launchable(x, mask, out)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("out must be contiguous with the shape and dtype of x")
    if x.numel() == 0:
        return out
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y2 = out.view(-1, n)
    m = x2.shape[0]

    lead = (1, 1, 1)
    mask_strides = (0, 0, 0, 0)
    mask_arg = x2  # dummy pointer when there is no mask
    if mask is not None:
        try:
            mexp = mask.expand(x.shape)
        except RuntimeError as e:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"{tuple(x.shape)}") from e
        if x.dim() > 4:  # fold the leading dims; a mask that cannot fold is materialized
            mexp = mexp.reshape(-1, x.shape[-3], x.shape[-2], n)
        mexp = mexp.reshape((1,) * (4 - mexp.dim()) + tuple(mexp.shape)) if mexp.dim() < 4 else mexp
        lead = tuple(mexp.shape[:3])
        mask_strides = tuple(mexp.stride())
        mask_arg = mexp

    if block_n is None:
        block_n = row_block_n(n)
    single_tile = block_n >= n
    args = (x2, mask_arg, y2, m, n, x2.stride(0), y2.stride(0), lead[1], lead[2], *mask_strides)
    meta = dict(HAS_MASK=mask is not None, BLOCK_N=block_n, SINGLE_TILE=single_tile)
    launch_rows(_softmax_fwd_kernel, _softmax_fwd_tuned, m, args, meta, x, shares_storage(out, x))
    return out


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("kiln::softmax", mutates_args=())
def softmax(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``softmax(x + mask, dim=-1)``; fully masked rows give zeros. CPU runs the reference,
    CUDA Triton."""
    return softmax_reference(x, mask)


@softmax.register_kernel("cuda")
def _softmax_cuda(x, mask):
    return softmax_triton(x, mask)


@softmax.register_fake
def _softmax_fake(x, mask):
    return x.new_empty(x.shape)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def softmax_reference(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-torch softmax in fp32 (float64 stays float64) with the kernel's convention that
    a row of all ``-inf`` gives zeros."""
    c = compute_dtype(x.dtype)
    s = x.to(c)
    if mask is not None:
        s = s + mask.to(c)
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    y = torch.where(denom > 0, e / denom, torch.zeros_like(e))
    return y.to(x.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------
def softmax_cost(
    num_rows: int,
    row_len: int,
    dtype: torch.dtype,
    *,
    mask_numel: int = 0,
    mask_dtype: Optional[torch.dtype] = None,
) -> Cost:
    """FLOPs and minimum bytes of a masked softmax over ``num_rows`` rows of ``row_len``.

    Per element: max (1), subtract (1), exp (1), sum (1), normalize (1), mask add (1 if a
    mask is given). Bytes: read x, write y, and read the mask's own ``mask_numel`` elements
    once (a broadcast mask is not expanded).
    """
    elems = num_rows * row_len
    has_mask = mask_numel > 0
    flops = elems * (5 + int(has_mask))
    nbytes = 2 * elems * itemsize(dtype)
    if has_mask:
        nbytes += mask_numel * itemsize(mask_dtype or dtype)
    return Cost(flops=flops, bytes=nbytes)


def _cost_from_args(x, mask) -> Cost:
    n = x.shape[-1]
    return softmax_cost(
        x.numel() // max(n, 1), n, x.dtype,
        mask_numel=mask.numel() if mask is not None else 0,
        mask_dtype=mask.dtype if mask is not None else None,
    )


register_cost("softmax", softmax_cost, _cost_from_args)
