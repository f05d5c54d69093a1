"""RMSNorm over the last dimension, optionally fused with the residual add before it.

``y = x / sqrt(mean(x**2) + eps) * weight`` (Llama, Mistral, T5). Like
:mod:`kiln.layer_norm`, the fused form reads ``x`` and ``residual`` once and writes both the
sum (the next residual) and the normalized output; the mean square is accumulated in fp32.
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
    load_residual_sum,
    norm_outputs,
    row_autotune,
    row_block_n,
    rows_view,
    shares_storage,
)
from kiln_kernels.cost import Cost, itemsize, register_cost

__all__ = ["rms_norm", "add_rms_norm", "rms_norm_triton", "rms_norm_reference", "rms_norm_cost"]


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(
    X, RES, W, Y, RES_OUT,
    M, N,
    stride_x, stride_res, stride_y, stride_res_out,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    """Normalize BLOCK_M rows; SINGLE_TILE reads each row once, otherwise two walks over
    BLOCK_N chunks (mean square, then scale), the second reading the stored residual sum."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows = rows.to(tl.int64)  # M * stride can pass 2**31 elements on large batches
    cols = tl.arange(0, BLOCK_N)
    x_row = X + rows[:, None] * stride_x
    res_row = RES + rows[:, None] * stride_res
    y_row = Y + rows[:, None] * stride_y
    res_out_row = RES_OUT + rows[:, None] * stride_res_out

    if SINGLE_TILE:
        mask = row_mask[:, None] & (cols[None, :] < N)
        # the sum is rounded to the input dtype, as the unfused `x + residual` is
        x = load_residual_sum(x_row + cols[None, :], res_row + cols[None, :], res_out_row + cols[None, :], mask,
                              HAS_RESIDUAL)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = x * rstd[:, None] * w[None, :]
        tl.store(y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = load_residual_sum(x_row + c[None, :], res_row + c[None, :], res_out_row + c[None, :], mask,
                                  HAS_RESIDUAL)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
        if HAS_RESIDUAL:
            tl.debug_barrier()  # RES_OUT is read back: make every thread's stores visible
            src_row = res_out_row
        else:
            src_row = x_row
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = tl.load(src_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
            y = x * rstd[:, None] * w[None, :]
            tl.store(y_row + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


# Tile search space and pruning shared by the row kernels: kernels/_util.py.
_rms_norm_fwd_tuned = row_autotune(_rms_norm_fwd_kernel, key=["BLOCK_N", "HAS_RESIDUAL", "SINGLE_TILE"])


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
# Rows up to MAX_FUSED_N elements stay in registers and are read once; wider ones are walked
# in LOOP_BLOCK_N chunks (`_util.row_block_n`).


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x`` with the Triton kernel.

    Args:
        x: [..., N] fp32/fp16/bf16.
        weight: [N], any float dtype.
        eps: added to the mean square.
        residual: optional, shaped and typed like ``x``; ``h = x + residual`` (rounded to
            ``x.dtype``) is normalized and returned too.
        out, residual_out: optional contiguous output buffers shaped like ``x``; they may be
            ``x``/``residual`` themselves (in place, as vLLM's fused_add_rms_norm).
        block_n: force the column tile (power of two); below N selects the looped path.

    Returns:
        ``y``, or ``(y, h)`` with a residual.

    Raises:
        TypeError, ValueError: unsupported dtype or mismatched shapes.
        RuntimeError: tensors the current Triton mode cannot launch on.
    """
    check_dtype("x", x, FLOAT_DTYPES)
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight must have shape ({n},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must have the shape and dtype of x")
    check_launchable(x, weight, residual, out, residual_out)

    out, residual_out = norm_outputs(x, residual, out, residual_out)
    if x.numel() == 0:
        return out if residual is None else (out, residual_out)

    x2 = rows_view(x, n)
    y2 = out.view(-1, n)
    r2 = rows_view(residual, n) if residual is not None else x2
    ro2 = residual_out.view(-1, n) if residual is not None else y2
    w = weight.contiguous()
    m = x2.shape[0]
    if block_n is None:
        block_n = row_block_n(n)
    single_tile = block_n >= n
    args = (x2, r2, w, y2, ro2, m, n, x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0), eps)
    meta = dict(HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, SINGLE_TILE=single_tile)
    in_place = any(shares_storage(o, i) for o in (out, residual_out) for i in (x, residual))
    launch_rows(_rms_norm_fwd_kernel, _rms_norm_fwd_tuned, m, args, meta, x, in_place)
    return out if residual is None else (out, residual_out)


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("kiln::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; fp32 statistics. CPU runs the reference, CUDA Triton."""
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_kernel("cuda")
def _rms_norm_cuda(x, weight, eps):
    return rms_norm_triton(x, weight, eps)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("kiln::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual; return rms_norm(h), h`` in one pass."""
    return rms_norm_reference(x, weight, eps, residual)


@add_rms_norm.register_kernel("cuda")
def _add_rms_norm_cuda(x, residual, weight, eps):
    return rms_norm_triton(x, weight, eps, residual)


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch RMSNorm with the kernel's semantics: fp32 statistics (float64 stays
    float64) and one rounding of ``x * rstd * weight`` to ``x.dtype`` (HF's Llama rounds
    ``x * rstd`` before the weight; the difference is within one output ulp)."""
    h = x + residual if residual is not None else x
    c = compute_dtype(x.dtype)
    hc = h.to(c)
    y = hc * torch.rsqrt(hc.square().mean(dim=-1, keepdim=True) + eps) * weight.to(c)
    y = y.to(x.dtype).contiguous()
    return y if residual is None else (y, h.contiguous())


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------
def rms_norm_cost(
    num_rows: int,
    hidden: int,
    dtype: torch.dtype,
    *,
    residual: bool = False,
    weight_dtype: Optional[torch.dtype] = None,
) -> Cost:
    """FLOPs and minimum bytes of RMSNorm over ``num_rows`` rows of ``hidden`` elements.

    Per element: square (1), accumulate (1), scale by rstd (1), weight (1), residual add (1 if
    fused); per-row rsqrt left out. Bytes: read x, write y (and read the residual, write the
    sum), weight read once.
    """
    elems = num_rows * hidden
    flops = elems * (4 + int(residual))
    nbytes = elems * itemsize(dtype) * (4 if residual else 2) + hidden * itemsize(weight_dtype or dtype)
    return Cost(flops=flops, bytes=nbytes)


def _cost_from_args(x, weight, eps) -> Cost:
    n = x.shape[-1]
    return rms_norm_cost(x.numel() // max(n, 1), n, x.dtype, weight_dtype=weight.dtype)


def _add_cost_from_args(x, residual, weight, eps) -> Cost:
    n = x.shape[-1]
    return rms_norm_cost(x.numel() // max(n, 1), n, x.dtype, residual=True, weight_dtype=weight.dtype)


def _add_rms_norm_cost(num_rows: int, hidden: int, dtype: torch.dtype, **kw) -> Cost:
    """:func:`rms_norm_cost` with the fused residual add."""
    return rms_norm_cost(num_rows, hidden, dtype, residual=True, **kw)


register_cost("rms_norm", rms_norm_cost, _cost_from_args)
register_cost("add_rms_norm", _add_rms_norm_cost, _add_cost_from_args)
