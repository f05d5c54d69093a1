"""LayerNorm over the last dimension, optionally fused with the residual add before it.

Transformer blocks do ``h = x + residual; y = layer_norm(h)``; eager PyTorch reads ``x`` and
``residual``, writes ``h``, reads ``h`` again, and writes ``y``. The fused kernel reads each
input once and writes ``h`` and ``y`` once. Statistics are accumulated in fp32 whatever the
input dtype: MiniLM's ``eps = 1e-12`` is below fp16's smallest subnormal, and the variance of
a row of fp16 values summed in fp16 loses most of its digits.
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

__all__ = [
    "layer_norm",
    "add_layer_norm",
    "layer_norm_triton",
    "layer_norm_reference",
    "layer_norm_cost",
]


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_fwd_kernel(
    X, RES, W, B, Y, RES_OUT,
    M, N,
    stride_x, stride_res, stride_y, stride_res_out,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    """Normalize BLOCK_M rows. SINGLE_TILE: the whole row fits one [BLOCK_M, BLOCK_N] tile and
    is read once; otherwise the row is walked in BLOCK_N chunks three times (sum, centered sum
    of squares, normalize), reading the residual sum back from RES_OUT after the first walk."""
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
        # the sum is rounded to the input dtype, as the unfused `h = x + residual` is
        x = load_residual_sum(x_row + cols[None, :], res_row + cols[None, :], res_out_row + cols[None, :], mask,
                              HAS_RESIDUAL)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            b = tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
            y += b[None, :]
        tl.store(y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: residual sum (stored) and row sum.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            acc += load_residual_sum(x_row + c[None, :], res_row + c[None, :], res_out_row + c[None, :], mask,
                                     HAS_RESIDUAL)
        mean = tl.sum(acc, axis=1) / N
        if HAS_RESIDUAL:
            # RES_OUT is read back below; the barrier makes every thread's stores visible.
            tl.debug_barrier()
            src_row = res_out_row
        else:
            src_row = x_row
        # Pass 2: centered sum of squares (two-pass: no cancellation, unlike E[x^2] - E[x]^2).
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = tl.load(src_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
        # Pass 3: normalize.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = tl.load(src_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                b = tl.load(B + c, mask=c < N, other=0.0).to(tl.float32)
                y += b[None, :]
            tl.store(y_row + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


# Tile search space and pruning shared by the row kernels: kernels/_util.py.
_layer_norm_fwd_tuned = row_autotune(_layer_norm_fwd_kernel, key=["BLOCK_N", "HAS_RESIDUAL", "SINGLE_TILE"])


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
# Rows up to MAX_FUSED_N elements stay in registers and are read once; wider ones are walked
# in LOOP_BLOCK_N chunks (`_util.row_block_n`).


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of ``x`` with the Triton kernel.

    Args:
        x: [..., N] fp32/fp16/bf16.
        weight, bias: [N], any float dtype (upcast to fp32 in the kernel); ``bias`` optional.
        eps: added to the variance.
        residual: optional tensor shaped like ``x``; then ``h = x + residual`` (rounded to
            ``x.dtype``) is normalized and also returned.
        out, residual_out: optional contiguous output buffers shaped like ``x``; they may be
            ``x``/``residual`` themselves (in place).
        block_n: force the column tile (a power of two); below N it selects the looped path.
            Tests use it to cover the wide-row path on small rows.

    Returns:
        ``y``, or ``(y, h)`` when ``residual`` is given; both shaped and typed like ``x``.

    Raises:
        TypeError, ValueError: unsupported dtype or mismatched shapes.
        RuntimeError: tensors the current Triton mode cannot launch on (see ``_util``).
    """
    check_dtype("x", x, FLOAT_DTYPES)
    n = x.shape[-1]
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"weight and bias must have shape ({n},)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must have the shape and dtype of x")
    check_launchable(x, weight, bias, residual, out, residual_out)

    out, residual_out = norm_outputs(x, residual, out, residual_out)
    if x.numel() == 0:
        return out if residual is None else (out, residual_out)

    x2 = rows_view(x, n)
    y2 = out.view(-1, n)
    r2 = rows_view(residual, n) if residual is not None else x2
    ro2 = residual_out.view(-1, n) if residual is not None else y2
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w  # dummy pointer, never read
    m = x2.shape[0]

    if block_n is None:
        block_n = row_block_n(n)
    single_tile = block_n >= n
    args = (x2, r2, w, b, y2, ro2, m, n,
            x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0), eps)
    meta = dict(HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
                BLOCK_N=block_n, SINGLE_TILE=single_tile)
    in_place = any(shares_storage(o, i) for o in (out, residual_out) for i in (x, residual))
    launch_rows(_layer_norm_fwd_kernel, _layer_norm_fwd_tuned, m, args, meta, x, in_place)
    return out if residual is None else (out, residual_out)


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("kiln::layer_norm", mutates_args=())
def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """LayerNorm over the last dim; fp32 statistics. CPU runs the reference, CUDA Triton."""
    return layer_norm_reference(x, weight, bias, eps)


@layer_norm.register_kernel("cuda")
def _layer_norm_cuda(x, weight, bias, eps):
    return layer_norm_triton(x, weight, bias, eps)


@layer_norm.register_fake
def _layer_norm_fake(x, weight, bias, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("kiln::add_layer_norm", mutates_args=())
def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual; return layer_norm(h), h`` in one pass (``h`` feeds the next
    residual). CPU runs the reference, CUDA Triton."""
    return layer_norm_reference(x, weight, bias, eps, residual)


@add_layer_norm.register_kernel("cuda")
def _add_layer_norm_cuda(x, residual, weight, bias, eps):
    return layer_norm_triton(x, weight, bias, eps, residual)


@add_layer_norm.register_fake
def _add_layer_norm_fake(x, residual, weight, bias, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch LayerNorm with the kernel's semantics: the residual sum is rounded to
    ``x.dtype``, statistics use the biased variance in fp32 (float64 stays float64).
    Returns ``y`` or ``(y, h)`` like :func:`layer_norm_triton`; outputs are contiguous."""
    h = x + residual if residual is not None else x
    c = compute_dtype(x.dtype)
    hc = h.to(c)
    mean = hc.mean(dim=-1, keepdim=True)
    var = (hc - mean).square().mean(dim=-1, keepdim=True)
    y = (hc - mean) * torch.rsqrt(var + eps) * weight.to(c)
    if bias is not None:
        y = y + bias.to(c)
    y = y.to(x.dtype).contiguous()
    return y if residual is None else (y, h.contiguous())


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------
def layer_norm_cost(
    num_rows: int,
    hidden: int,
    dtype: torch.dtype,
    *,
    residual: bool = False,
    has_bias: bool = True,
    weight_dtype: Optional[torch.dtype] = None,
) -> Cost:
    """FLOPs and minimum bytes of LayerNorm over ``num_rows`` rows of ``hidden`` elements.

    Per element: sum (1), center (1), square and accumulate (2), scale by rstd (1), weight (1),
    bias (1 if present), residual add (1 if fused). Per-row divisions and rsqrt are left out.
    Bytes: read x and write y; with a residual also read it and write the sum; weight and bias
    read once.
    """
    elems = num_rows * hidden
    es = itemsize(dtype)
    ws = itemsize(weight_dtype or dtype)
    flops = elems * (6 + int(has_bias) + int(residual))
    nbytes = elems * es * (4 if residual else 2) + hidden * ws * (1 + int(has_bias))
    return Cost(flops=flops, bytes=nbytes)


def _cost_from_args(x, weight, bias, eps) -> Cost:
    n = x.shape[-1]
    return layer_norm_cost(x.numel() // max(n, 1), n, x.dtype, has_bias=bias is not None,
                           weight_dtype=weight.dtype)


def _add_cost_from_args(x, residual, weight, bias, eps) -> Cost:
    n = x.shape[-1]
    return layer_norm_cost(x.numel() // max(n, 1), n, x.dtype, residual=True,
                           has_bias=bias is not None, weight_dtype=weight.dtype)


def _add_layer_norm_cost(num_rows: int, hidden: int, dtype: torch.dtype, **kw) -> Cost:
    """:func:`layer_norm_cost` with the fused residual add."""
    return layer_norm_cost(num_rows, hidden, dtype, residual=True, **kw)


register_cost("layer_norm", layer_norm_cost, _cost_from_args)
register_cost("add_layer_norm", _add_layer_norm_cost, _add_cost_from_args)
