"""Bias add fused with GELU, the epilogue of every BERT/GPT feed-forward up-projection.

Eager ``gelu(x + bias)`` writes and re-reads the pre-activation; this reads ``x`` once and
writes ``y`` once. Both GELU forms are provided: the exact erf form (BERT, ``F.gelu``'s default)
and the tanh approximation (GPT-2, ``F.gelu(approximate="tanh")``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kiln_kernels._util import FLOAT_DTYPES, check_dtype, check_launchable, compute_dtype, shares_storage, use_autotune
from kiln_kernels.cost import Cost, itemsize, register_cost

__all__ = ["bias_gelu", "bias_gelu_triton", "bias_gelu_reference", "bias_gelu_cost", "gelu"]

_APPROXIMATIONS = ("none", "tanh")


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def gelu(x, APPROX: tl.constexpr):
    """GELU of an fp32 block: erf form (APPROX == "none") or tanh form ("tanh"). Shared with
    the int8_weight_linear epilogue."""
    if APPROX == "tanh":
        # sqrt(2/pi) * (x + 0.044715 x^3); tanh(u) = 2 / (1 + exp(-2u)) - 1, with u clamped
        # to +-10 where fp32 tanh is already +-1, so exp never overflows.
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        u = tl.minimum(tl.maximum(u, -10.0), 10.0)
        t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0
        y = 0.5 * x * (1.0 + t)
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # 1/sqrt(2)
    return y


@triton.jit
def _bias_gelu_kernel(
    X, BIAS, Y,
    numel, N,
    HAS_BIAS: tl.constexpr,
    APPROX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One flat BLOCK of a contiguous [.., N] tensor; the bias index is the column."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(BIAS + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, gelu(x, APPROX).to(Y.dtype.element_ty), mask=mask)


# A streaming kernel: 16 bytes per thread per access (8 fp16) and enough bytes in flight per SM
# is what matters; the block sizes cover 4..32 elements per thread on Ampere and Hopper.
_CONFIGS = [
    triton.Config({"BLOCK": b}, num_warps=nw)
    for b in (1024, 2048, 4096, 8192)
    for nw in (4, 8)
]
_bias_gelu_tuned = triton.autotune(configs=_CONFIGS, key=["N", "HAS_BIAS", "APPROX"])(_bias_gelu_kernel)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
_INTERPRET_BLOCK = 256  # small so odd sizes end in a partial block; the interpreter is slow
_GPU_BLOCK = 4096  # in-place calls skip autotuning: 16 elements per thread at 8 warps


def bias_gelu_triton(
    x: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    approximate: str = "none",
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``gelu(x + bias)`` with the Triton kernel, computed in fp32.

    Args:
        x: [..., N] fp32/fp16/bf16.
        bias: optional [N], any float dtype.
        approximate: ``"none"`` (erf) or ``"tanh"``, as in ``torch.nn.functional.gelu``.
        out: optional contiguous output buffer shaped and typed like ``x`` (``x`` itself, if
            contiguous, for an in-place call).

    Raises:
        ValueError: unknown ``approximate``, bias of the wrong shape, or a bad ``out``.
        TypeError: unsupported dtype.
        RuntimeError: tensors the current Triton mode cannot launch on.
    """
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")
    check_dtype("x", x, FLOAT_DTYPES)
    n = x.shape[-1] if x.dim() else 1
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    check_launchable(x, bias, out)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("out must be contiguous with the shape and dtype of x")
    numel = x.numel()
    if numel == 0:
        return out
    xc = x.contiguous()
    b = bias.contiguous() if bias is not None else xc  # dummy pointer, never read
    meta = dict(HAS_BIAS=bias is not None, APPROX=approximate)
    if use_autotune(x) and not shares_storage(out, x):
        grid = lambda META: (triton.cdiv(numel, META["BLOCK"]),)  # noqa: E731
        _bias_gelu_tuned[grid](xc, b, out, numel, n, **meta)
    else:
        block = _GPU_BLOCK if use_autotune(x) else _INTERPRET_BLOCK
        _bias_gelu_kernel[(triton.cdiv(numel, block),)](xc, b, out, numel, n, **meta, BLOCK=block, num_warps=8)
    return out


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("kiln::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "none") -> torch.Tensor:
    """``gelu(x + bias)``; ``approximate`` is ``"none"`` (erf) or ``"tanh"``. CPU runs the
    reference, CUDA Triton."""
    return bias_gelu_reference(x, bias, approximate)


@bias_gelu.register_kernel("cuda")
def _bias_gelu_cuda(x, bias, approximate="none"):
    return bias_gelu_triton(x, bias, approximate)


@bias_gelu.register_fake
def _bias_gelu_fake(x, bias, approximate="none"):
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")
    return x.new_empty(x.shape)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def bias_gelu_reference(
    x: torch.Tensor, bias: Optional[torch.Tensor] = None, approximate: str = "none"
) -> torch.Tensor:
    """``F.gelu(x + bias, approximate=...)`` computed in fp32 (float64 stays float64) and
    rounded once to ``x.dtype``."""
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")
    c = compute_dtype(x.dtype)
    h = x.to(c) + bias.to(c) if bias is not None else x.to(c)
    return torch.nn.functional.gelu(h, approximate=approximate).to(x.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------
def bias_gelu_cost(
    numel: int,
    hidden: int,
    dtype: torch.dtype,
    *,
    approximate: str = "none",
    has_bias: bool = True,
    bias_dtype: Optional[torch.dtype] = None,
) -> Cost:
    """FLOPs and minimum bytes of ``gelu(x + bias)`` on ``numel`` elements, bias of ``hidden``.

    Per element: bias add (1 if present); erf form: scale, erf, +1, *x, *0.5 (5); tanh form:
    x^3 (2), *0.044715, +x, *sqrt(2/pi), tanh, +1, *x, *0.5 (9). Bytes: read x, write y, read
    the bias once.
    """
    per = (5 if approximate == "none" else 9) + int(has_bias)
    nbytes = 2 * numel * itemsize(dtype)
    if has_bias:
        nbytes += hidden * itemsize(bias_dtype or dtype)
    return Cost(flops=numel * per, bytes=nbytes)


def _cost_from_args(x, bias, approximate="none") -> Cost:
    return bias_gelu_cost(
        x.numel(), x.shape[-1] if x.dim() else 1, x.dtype, approximate=approximate,
        has_bias=bias is not None, bias_dtype=bias.dtype if bias is not None else None,
    )


register_cost("bias_gelu", bias_gelu_cost, _cost_from_args)
