"""Fused scale + additive mask + softmax (CUDA C++, rows of at most 1024 columns).

Registered as `torch.ops.kiln_cuda.scale_mask_softmax`: CUDA tensors run csrc/softmax.cu,
CPU tensors run the reference. Fully masked rows give zeros, not NaN.
"""

from __future__ import annotations

import torch

from kiln_kernels.native._ext import DTYPE_CODES, check_cuda_tensor, extension, stream_handle

MAX_COLS = 1024  # one warp per row, 32 values per lane in registers (csrc/softmax.cu)


def scale_mask_softmax_cuda(x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(x * scale + mask) over the last dim on the GPU.

    `mask` is additive and broadcasts over x's leading dims by whole rows: its number of rows
    (product of leading dims) must divide x's, e.g. scores [B, H, Sq, Sk] with a key-padding
    mask [B, 1, 1, Sk] viewed as [B, Sk].
    """
    check_cuda_tensor("x", x, tuple(DTYPE_CODES), align=x.element_size())
    cols = x.shape[-1]
    if not 1 <= cols <= MAX_COLS:
        raise ValueError(f"scale_mask_softmax handles rows of 1..{MAX_COLS} columns; got {cols}")
    rows = x.numel() // cols
    rows_per_mask = rows
    mask_ptr = 0
    if mask is not None:
        mask = mask.to(device=x.device, dtype=torch.float32).contiguous()
        if mask.shape[-1] != cols:
            raise ValueError(f"mask's last dim ({mask.shape[-1]}) must equal x's ({cols})")
        mask_rows = mask.numel() // cols
        if mask_rows == 0 or rows % mask_rows:
            raise ValueError(f"mask has {mask_rows} rows, which does not divide x's {rows} rows")
        rows_per_mask = rows // mask_rows
        mask_ptr = mask.data_ptr()
    out = torch.empty_like(x)
    extension().scale_mask_softmax(
        DTYPE_CODES[x.dtype], x.data_ptr(), mask_ptr, out.data_ptr(), rows, cols, rows_per_mask, float(scale),
        stream_handle(x),
    )
    return out


def scale_mask_softmax_reference(x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Plain-torch reference in fp32 (fully masked rows → zeros), result in x's dtype."""
    cols = x.shape[-1]
    z = x.float().reshape(-1, cols) * scale
    if mask is not None:
        m = mask.float().reshape(-1, cols)
        z = (z.reshape(m.shape[0], -1, cols) + m[:, None, :]).reshape(-1, cols)
    row_max = z.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    e = torch.exp(z - torch.where(empty, torch.zeros_like(row_max), row_max))
    e = torch.where(empty, torch.zeros_like(e), e)
    denom = e.sum(dim=-1, keepdim=True)
    out = torch.where(denom > 0, e / denom.clamp(min=torch.finfo(torch.float32).tiny), e)
    return out.reshape(x.shape).to(x.dtype)


@torch.library.custom_op("kiln_cuda::scale_mask_softmax", mutates_args=())
def scale_mask_softmax(x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    if x.is_cuda:
        return scale_mask_softmax_cuda(x, mask, scale)
    return scale_mask_softmax_reference(x, mask, scale)


@scale_mask_softmax.register_fake
def _(x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return torch.empty_like(x)
