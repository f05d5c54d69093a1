"""Packed variable-length batches: remove padding using the attention mask, restore it later.

`pack_indices(mask)` gives the flat index of every real token (row-major, so each sequence's
tokens stay in order), `cu_seqlens` (int32 prefix sums, the FlashAttention varlen convention)
and the longest length; `gather_rows` packs any [batch, seq, ...] tensor to [tokens, ...] and
`scatter_rows` restores [batch, seq, ...] with zeros at padding. CUDA tensors run
csrc/packing.cu; CPU tensors run the reference.
"""

from __future__ import annotations

import torch

from kiln_kernels.native._ext import check_cuda_tensor, extension, stream_handle

MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64)


def pack_indices_cuda(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_cuda_tensor("mask", mask, MASK_DTYPES, align=mask.element_size())
    if mask.dim() != 2:
        raise ValueError(f"mask must be [batch, seq]; got shape {tuple(mask.shape)}")
    batch, seq = mask.shape
    ext, stream = extension(), stream_handle(mask)
    lengths = torch.empty(batch, dtype=torch.int32, device=mask.device)
    cu_seqlens = torch.empty(batch + 1, dtype=torch.int32, device=mask.device)
    max_len = torch.zeros(1, dtype=torch.int32, device=mask.device)
    ext.sequence_lengths(mask.data_ptr(), mask.element_size(), batch, seq, lengths.data_ptr(),
                         cu_seqlens.data_ptr(), max_len.data_ptr(), stream)
    tokens = int(cu_seqlens[-1].item())  # one sync: the packed size decides the allocation
    token_index = torch.empty(tokens, dtype=torch.int32, device=mask.device)
    ext.token_indices(mask.data_ptr(), mask.element_size(), batch, seq, cu_seqlens.data_ptr(),
                      token_index.data_ptr(), stream)
    return token_index, cu_seqlens, max_len


def pack_indices_reference(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = (mask != 0).sum(dim=1)
    cu_seqlens = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    token_index = torch.nonzero(mask.reshape(-1) != 0).reshape(-1).to(torch.int32)
    max_len = lengths.max().reshape(1).to(torch.int32) if mask.shape[0] else torch.zeros(1, dtype=torch.int32)
    return token_index, cu_seqlens, max_len


def _rows(x: torch.Tensor, leading: int) -> tuple[int, int]:
    rows = 1
    for d in x.shape[:leading]:
        rows *= d
    return rows, (x.numel() // rows if rows else 0) * x.element_size()


def gather_rows_cuda(x: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    check_cuda_tensor("x", x, (x.dtype,), align=x.element_size())
    check_cuda_tensor("token_index", token_index, (torch.int32,), align=4)
    _, row_bytes = _rows(x, 2)
    out = torch.empty((token_index.numel(), *x.shape[2:]), dtype=x.dtype, device=x.device)
    extension().gather_rows(x.data_ptr(), token_index.data_ptr(), token_index.numel(), row_bytes, out.data_ptr(),
                            stream_handle(x))
    return out


def scatter_rows_cuda(packed: torch.Tensor, token_index: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    check_cuda_tensor("packed", packed, (packed.dtype,), align=packed.element_size())
    check_cuda_tensor("token_index", token_index, (torch.int32,), align=4)
    _, row_bytes = _rows(packed, 1)
    out = torch.empty((batch, seq, *packed.shape[1:]), dtype=packed.dtype, device=packed.device)
    extension().scatter_rows(packed.data_ptr(), token_index.data_ptr(), token_index.numel(), batch * seq, row_bytes,
                             out.data_ptr(), stream_handle(packed))
    return out


@torch.library.custom_op("kiln_cuda::pack_indices", mutates_args=())
def pack_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_index int32 [tokens], cu_seqlens int32 [batch + 1], max_len int32 [1]) of a mask."""
    if mask.is_cuda:
        return pack_indices_cuda(mask)
    return pack_indices_reference(mask)


@pack_indices.register_fake
def _(mask):  # type: ignore[no-untyped-def]
    tokens = torch.library.get_ctx().new_dynamic_size()
    return (mask.new_empty(tokens, dtype=torch.int32), mask.new_empty(mask.shape[0] + 1, dtype=torch.int32),
            mask.new_empty(1, dtype=torch.int32))


@torch.library.custom_op("kiln_cuda::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Pack [batch, seq, ...] → [tokens, ...] by `token_index` (from `pack_indices`)."""
    if x.is_cuda:
        return gather_rows_cuda(x, token_index)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])[token_index.long()]


@gather_rows.register_fake
def _(x, token_index):  # type: ignore[no-untyped-def]
    return x.new_empty((token_index.shape[0], *x.shape[2:]))


@torch.library.custom_op("kiln_cuda::scatter_rows", mutates_args=())
def scatter_rows(packed: torch.Tensor, token_index: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Restore [batch, seq, ...] from packed rows; padding positions are zero."""
    if packed.is_cuda:
        return scatter_rows_cuda(packed, token_index, batch, seq)
    out = packed.new_zeros((batch * seq, *packed.shape[1:]))
    out[token_index.long()] = packed
    return out.reshape(batch, seq, *packed.shape[1:])


@scatter_rows.register_fake
def _(packed, token_index, batch, seq):  # type: ignore[no-untyped-def]
    return packed.new_empty((batch, seq, *packed.shape[1:]))
