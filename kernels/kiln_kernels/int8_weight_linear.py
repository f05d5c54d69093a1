"""Weight-only int8 linear layer: ``act((x @ dequant(w).T) + bias)`` with the dequant fused.

At small batch a linear layer is a matrix-vector product whose time is the time to read the
weight; int8 weights halve that against fp16. The kernel loads int8 tiles, converts them to the
activation dtype in registers (exact: every int8 is representable in fp16 and bf16), runs the
tensor-core dot in fp32, and applies the per-output-channel scale, the bias and optionally GELU
in the epilogue. Small batches split the K loop across programs so the GPU has enough of them
to pull the whole weight through memory at once.
"""

from __future__ import annotations

import functools
from typing import Optional

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
from kiln_kernels.bias_gelu import gelu
from kiln_kernels.cost import Cost, itemsize, register_cost

__all__ = [
    "int8_weight_linear",
    "int8_weight_linear_triton",
    "int8_weight_linear_reference",
    "int8_weight_linear_cost",
    "quantize_int8_per_channel",
    "ACTIVATIONS",
]

#: Epilogue activations: none, exact (erf) GELU, tanh-approximated GELU.
ACTIVATIONS = ("none", "gelu", "gelu_tanh")


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _epilogue(acc, SCALE, BIAS, offs_n, n_mask, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """Per-output-channel scale, bias, activation on an fp32 [BLOCK_M, BLOCK_N] tile."""
    acc = acc * tl.load(SCALE + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "gelu":
        acc = gelu(acc, "none")
    elif ACTIVATION == "gelu_tanh":
        acc = gelu(acc, "tanh")
    return acc


@triton.jit
def _int8_linear_kernel(
    X, W, SCALE, BIAS, Y, WS,
    M, N, K, M_BUCKET,  # M_BUCKET: autotune key only (next power of two of M)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile over a 1/SPLIT_K share of K. With SPLIT_K == 1 the
    epilogue runs here; otherwise fp32 partial sums go to the workspace WS [SPLIT_K, M, N]."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped ordering (Triton matmul tutorial): GROUP_M row-tiles share each weight column
    # tile while it is in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapping rows/columns (not masking) keeps every load in bounds and unmasked; the
    # duplicated rows/columns are dropped by the masked store.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    k_blocks = tl.cdiv(K, BLOCK_K)
    blocks_per_split = tl.cdiv(k_blocks, SPLIT_K)
    k_begin = pid_k * blocks_per_split
    k_end = tl.minimum(k_begin + blocks_per_split, k_blocks)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(k_begin, k_end):
        k = kb * BLOCK_K + offs_k
        k_mask = k < K
        a = tl.load(X + rm[:, None] * stride_xm + k[None, :] * stride_xk, mask=k_mask[None, :], other=0.0)
        b = tl.load(W + rn[None, :] * stride_wn + k[:, None] * stride_wk, mask=k_mask[:, None], other=0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)

    m_mask = offs_m < M
    n_mask = offs_n < N
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        acc = _epilogue(acc, SCALE, BIAS, offs_n, n_mask, HAS_BIAS, ACTIVATION)
        y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=out_mask)
    else:
        ws_ptrs = WS + (pid_k * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=out_mask)


@triton.jit
def _int8_linear_reduce_kernel(
    WS, SCALE, BIAS, Y,
    M, N, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Sum the SPLIT_K partial tiles and apply the epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    rows = offs_m.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(WS + (s * M + rows)[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    acc = _epilogue(acc, SCALE, BIAS, offs_n, n_mask, HAS_BIAS, ACTIVATION)
    tl.store(Y + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _device_limits(device_index: int) -> tuple[int, int]:
    """(opt-in shared memory per block in bytes, SM count) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024), props.multi_processor_count


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose pipelined tiles exceed the device's shared memory (227 KB on H100,
    163 KB on A100, 99 KB on consumer Ampere) and, for small batches, tiles far taller than M."""
    args = {**named_args, **kwargs}
    x = args["X"]
    limit, _ = _device_limits(x.device.index if x.device.index is not None else torch.cuda.current_device())
    m_bucket = args["M_BUCKET"]
    kept = []
    for c in configs:
        kw = c.kwargs
        smem = c.num_stages * kw["BLOCK_K"] * (kw["BLOCK_M"] * x.element_size() + kw["BLOCK_N"])
        if smem > limit or kw["BLOCK_M"] > max(16, 2 * m_bucket):
            continue
        kept.append(c)
    return kept or [configs[0]]


# Large-M tiles follow the Triton matmul tutorial's fp16 configs (128x256x64 with 3 stages and
# 8 warps is Hopper's best there, 128x128x32 with 4 stages Ampere's; with the GELU epilogue
# 128x256x64 spills 504 bytes on sm_90 per ptxas -v, so the 128x128 ones matter); BLOCK_M=16/32 tiles
# serve batch <= 32, where reading the int8 weight is the whole cost and a tall tile would
# only multiply padding. All are subject to _prune_configs.
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1}, num_stages=5, num_warps=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 1}, num_stages=4, num_warps=2),
]
_int8_linear_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["M_BUCKET", "N", "K", "SPLIT_K", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_int8_linear_kernel)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
# Interpreter tile: tl.dot's smallest legal shape is 16 in every dim; 16x32x32 keeps odd test
# shapes spread over several tiles and K blocks.
_INTERPRET_META = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
_REDUCE_BLOCK = (16, 128)
# Split K only for batches up to 64 and only while each split keeps >= 1024 of K (the partial
# sums cost 4 * SPLIT_K * M * N bytes of traffic, negligible next to N * K weight bytes then).
_SPLIT_MAX_M = 64
_SPLIT_MIN_K = 1024


def _auto_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Splits so that about two programs per SM exist when M alone gives too few tiles
    (64-wide column tiles assumed)."""
    if m > _SPLIT_MAX_M:
        return 1
    _, sms = _device_limits(device.index if device.index is not None else torch.cuda.current_device())
    tiles = triton.cdiv(m, 16) * triton.cdiv(n, 64)
    split = 1
    while tiles * split < 2 * sms and k // (2 * split) >= _SPLIT_MIN_K and split < 16:
        split *= 2
    return split


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization of an ``nn.Linear`` weight [N, K].

    Returns ``(w_int8 [N, K], scale [N] fp32)`` with ``weight ~= w_int8 * scale[:, None]``;
    values map to -127..127 (not -128, keeping the range symmetric). All-zero rows get scale 1.
    """
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    w_int8 = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return w_int8, scale


def int8_weight_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    *,
    out: Optional[torch.Tensor] = None,
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """``act((x @ (weight * scale[:, None]).T) + bias)`` with the Triton kernel.

    Args:
        x: [..., K] fp16/bf16 activations (fp32 also accepted; its dot runs in full fp32).
        weight: [N, K] int8, ``nn.Linear`` layout, any strides.
        scale: [N] per-output-channel scales, any float dtype.
        bias: optional [N].
        activation: one of :data:`ACTIVATIONS`.
        out: optional contiguous [..., N] output buffer in ``x.dtype``.
        split_k: number of K splits (power of two); default: chosen on GPU for small batches,
            1 under the interpreter. Tests use it to cover the split path.

    Raises:
        TypeError, ValueError: bad dtypes, shapes or activation.
        RuntimeError: tensors the current Triton mode cannot launch on.
    """
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("weight", weight, (torch.int8,))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [N, K] with K = x.shape[-1] = {x.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    n, k = weight.shape
    if scale.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"scale and bias must have shape ({n},)")
    check_launchable(x, weight, scale, bias, out)
    out_shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if out.shape != out_shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {out_shape} {x.dtype}")
    if shares_storage(out, x):
        raise ValueError("out must not share memory with x: every output tile reads whole rows of x")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return out
    if k == 0:  # an empty sum: only the epilogue of zeros remains
        return out.copy_(int8_weight_linear_reference(x, weight, scale, bias, activation))
    y2 = out.view(-1, n)
    s = scale.contiguous()
    b = bias.contiguous() if bias is not None else s  # dummy pointer, never read
    if split_k is None:
        split_k = _auto_split_k(m, n, k, x.device) if use_autotune(x) else 1
    ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else y2
    args = (x2, weight, s, b, y2, ws, m, n, k, triton.next_power_of_2(m),
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y2.stride(0), y2.stride(1))
    meta = dict(HAS_BIAS=bias is not None, ACTIVATION=activation, DOT_DTYPE=dot_dtype(x.dtype),
                DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SPLIT_K=split_k)
    if use_autotune(x):
        grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]), split_k)  # noqa: E731
        _int8_linear_tuned[grid](*args, **meta)
    else:
        bm, bn = _INTERPRET_META["BLOCK_M"], _INTERPRET_META["BLOCK_N"]
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split_k)
        _int8_linear_kernel[grid](*args, **meta, **_INTERPRET_META)
    if split_k > 1:
        bm, bn = _REDUCE_BLOCK
        _int8_linear_reduce_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            ws, s, b, y2, m, n, y2.stride(0), y2.stride(1),
            HAS_BIAS=bias is not None, ACTIVATION=activation, SPLIT_K=split_k,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
        )
    return out


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("kiln::int8_weight_linear", mutates_args=())
def int8_weight_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation: str = "none",
) -> torch.Tensor:
    """``act(x @ (weight * scale[:, None]).T + bias)`` with int8 ``weight`` [N, K], per-output-
    channel ``scale`` [N]; ``activation`` in "none", "gelu", "gelu_tanh". CPU runs the
    reference, CUDA Triton."""
    return int8_weight_linear_reference(x, weight, scale, bias, activation)


@int8_weight_linear.register_kernel("cuda")
def _int8_weight_linear_cuda(x, weight, scale, bias, activation="none"):
    return int8_weight_linear_triton(x, weight, scale, bias, activation)


@int8_weight_linear.register_fake
def _int8_weight_linear_fake(x, weight, scale, bias, activation="none"):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def int8_weight_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
) -> torch.Tensor:
    """Dequantize, matmul, epilogue in fp32 (float64 stays float64), one rounding to
    ``x.dtype``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    c = compute_dtype(x.dtype)
    y = (x.to(c) @ weight.to(c).t()) * scale.to(c)
    if bias is not None:
        y = y + bias.to(c)
    if activation == "gelu":
        y = torch.nn.functional.gelu(y)
    elif activation == "gelu_tanh":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    return y.to(x.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------
_ACTIVATION_FLOPS = {"none": 0, "gelu": 5, "gelu_tanh": 9}  # as in kernels/bias_gelu.py


def int8_weight_linear_cost(
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    *,
    has_bias: bool = True,
    activation: str = "none",
    scale_dtype: torch.dtype = torch.float32,
    bias_dtype: Optional[torch.dtype] = None,
) -> Cost:
    """FLOPs and minimum bytes of ``[m, k] @ int8 [n, k].T`` with the epilogue.

    FLOPs: ``2 m n k`` for the product (dequantization is a conversion, not counted), plus per
    output element the scale (1), bias (1 if present) and activation (erf GELU 5, tanh 9).
    Bytes: x read, int8 weight read (1 byte per element), scale and bias read, y written.
    Split-K partial sums are traffic above this minimum.
    """
    flops = 2 * m * n * k + m * n * (1 + int(has_bias) + _ACTIVATION_FLOPS[activation])
    es = itemsize(dtype)
    nbytes = m * k * es + n * k + n * itemsize(scale_dtype) + m * n * es
    if has_bias:
        nbytes += n * itemsize(bias_dtype or dtype)
    return Cost(flops=flops, bytes=nbytes)


def _cost_from_args(x, weight, scale, bias, activation="none") -> Cost:
    n, k = weight.shape
    return int8_weight_linear_cost(
        x.numel() // max(k, 1), n, k, x.dtype, has_bias=bias is not None, activation=activation,
        scale_dtype=scale.dtype, bias_dtype=bias.dtype if bias is not None else None,
    )


register_cost("int8_weight_linear", int8_weight_linear_cost, _cost_from_args)
