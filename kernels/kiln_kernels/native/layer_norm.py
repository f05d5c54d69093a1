"""Fused bias + residual + LayerNorm (CUDA C++, hidden sizes up to 1024).

Registered as `torch.ops.kiln_cuda.bias_residual_layer_norm`: CUDA tensors run
csrc/layer_norm.cu, CPU tensors run the reference. Returns (normalized, x + bias + residual);
the second output is the next layer's residual stream, saving a separate add kernel.
"""

from __future__ import annotations

import torch

from kiln_kernels.native._ext import DTYPE_CODES, check_cuda_tensor, extension, stream_handle

MAX_HIDDEN = 1024  # whole row in one warp's registers (csrc/layer_norm.cu)


def bias_residual_layer_norm_cuda(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm(x + bias + residual) * weight + ln_bias over the last dim, on the GPU."""
    dtypes = tuple(DTYPE_CODES)
    check_cuda_tensor("x", x, dtypes)
    hidden = x.shape[-1]
    vector = 16 // x.element_size()
    if hidden > MAX_HIDDEN or hidden % vector:
        raise ValueError(f"hidden size must be a multiple of {vector} and at most {MAX_HIDDEN}; got {hidden}")
    for name, t, shape in (("bias", bias, (hidden,)), ("residual", residual, tuple(x.shape)),
                           ("weight", weight, (hidden,)), ("ln_bias", ln_bias, (hidden,))):
        if t is None:
            continue
        check_cuda_tensor(name, t, (x.dtype,))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}; got {tuple(t.shape)}")
    out = torch.empty_like(x)
    summed = torch.empty_like(x)
    extension().bias_residual_layer_norm(
        DTYPE_CODES[x.dtype], x.data_ptr(), bias.data_ptr() if bias is not None else 0,
        residual.data_ptr() if residual is not None else 0, weight.data_ptr(),
        ln_bias.data_ptr() if ln_bias is not None else 0, out.data_ptr(), summed.data_ptr(),
        x.numel() // hidden, hidden, float(eps), stream_handle(x),
    )
    return out, summed


def bias_residual_layer_norm_reference(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference: sum and statistics in fp32, outputs in x's dtype."""
    s = x.to(torch.float32, copy=True)  # a custom op's output may not alias its input
    if bias is not None:
        s = s + bias.float()
    if residual is not None:
        s = s + residual.float()
    y = torch.nn.functional.layer_norm(s, (x.shape[-1],), weight.float(),
                                       ln_bias.float() if ln_bias is not None else None, eps)
    return y.to(x.dtype), s.to(x.dtype)


@torch.library.custom_op("kiln_cuda::bias_residual_layer_norm", mutates_args=())
def bias_residual_layer_norm(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda:
        return bias_residual_layer_norm_cuda(x, bias, residual, weight, ln_bias, eps)
    return bias_residual_layer_norm_reference(x, bias, residual, weight, ln_bias, eps)


@bias_residual_layer_norm.register_fake
def _(x, bias, residual, weight, ln_bias, eps):  # type: ignore[no-untyped-def]
    return torch.empty_like(x), torch.empty_like(x)
