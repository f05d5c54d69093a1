"""BERT's embedding block in one pass: word + position + token-type embedding, then LayerNorm.

Eager BERT gathers three embedding rows per token into three full [B, S, H] tensors, adds them
(two more), then normalizes: six passes over activation-sized memory. This kernel gathers each
token's rows, sums them in fp32 registers and writes only the normalized result.
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
    prune_row_configs,
    row_block_n,
)
from kiln_kernels.cost import Cost, itemsize, register_cost

__all__ = [
    "embedding_layer_norm",
    "embedding_layer_norm_triton",
    "embedding_layer_norm_reference",
    "embedding_layer_norm_cost",
]


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _embed(
    WORD, POS_EMB, TYPE_EMB, word_row, pos_row, type_row, c, mask,
    HAS_POS: tl.constexpr, HAS_TYPE: tl.constexpr,
):
    """fp32 sum of the gathered embedding rows at columns `c` ([BLOCK_M, BLOCK_N] tile)."""
    e = tl.load(WORD + word_row[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_POS:
        e += tl.load(POS_EMB + pos_row[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_TYPE:
        e += tl.load(TYPE_EMB + type_row[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    return e


@triton.jit
def _embedding_layer_norm_kernel(
    IDS, POS_IDS, TYPE_IDS, WORD, POS_EMB, TYPE_EMB, W, B, Y,
    M, N, seq_len,
    stride_word, stride_pos, stride_type, stride_y,
    eps,
    HAS_POS: tl.constexpr,
    HAS_POS_IDS: tl.constexpr,
    HAS_TYPE: tl.constexpr,
    HAS_TYPE_IDS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    """BLOCK_M tokens per program. Without position ids a token's position is its index in
    its sequence; without token-type ids every token uses type 0 (as Hugging Face BERT)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    word_row = tl.load(IDS + rows, mask=row_mask, other=0).to(tl.int64) * stride_word
    pos_row = word_row  # unused unless HAS_POS
    type_row = word_row  # unused unless HAS_TYPE
    if HAS_POS:
        if HAS_POS_IDS:
            pos_row = tl.load(POS_IDS + rows, mask=row_mask, other=0).to(tl.int64) * stride_pos
        else:
            pos_row = (rows % seq_len) * stride_pos
    if HAS_TYPE:
        if HAS_TYPE_IDS:
            type_row = tl.load(TYPE_IDS + rows, mask=row_mask, other=0).to(tl.int64) * stride_type
        else:
            type_row = rows * 0
    y_row = Y + rows[:, None] * stride_y

    if SINGLE_TILE:
        mask = row_mask[:, None] & (cols[None, :] < N)
        e = _embed(WORD, POS_EMB, TYPE_EMB, word_row, pos_row, type_row, cols, mask, HAS_POS, HAS_TYPE)
        mean = tl.sum(e, axis=1) / N
        ec = tl.where(mask, e - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(ec * ec, axis=1) / N + eps)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = ec * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Wide rows: three walks (sum, centered squares, normalize), re-gathering each time
        # rather than storing an unnormalized copy.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            acc += _embed(WORD, POS_EMB, TYPE_EMB, word_row, pos_row, type_row, c, mask, HAS_POS, HAS_TYPE)
        mean = tl.sum(acc, axis=1) / N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            e = _embed(WORD, POS_EMB, TYPE_EMB, word_row, pos_row, type_row, c, mask, HAS_POS, HAS_TYPE)
            ec = tl.where(mask, e - mean[:, None], 0.0)
            acc += ec * ec
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            e = _embed(WORD, POS_EMB, TYPE_EMB, word_row, pos_row, type_row, c, mask, HAS_POS, HAS_TYPE)
            w = tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
            y = (e - mean[:, None]) * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                y += tl.load(B + c, mask=c < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_row + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


# Gathers are row-contiguous, so this behaves like layer_norm: the same space for both archs.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=nw)
    for bm in (1, 2, 4, 8)
    for nw in (1, 2, 4, 8)
]
_embedding_layer_norm_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["BLOCK_N", "SINGLE_TILE", "HAS_POS", "HAS_TYPE"],
    prune_configs_by={"early_config_prune": prune_row_configs},
)(_embedding_layer_norm_kernel)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
_ID_DTYPES = (torch.int32, torch.int64)


def _ids(name: str, ids: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """Flatten an id tensor broadcastable to ``like`` (e.g. HF's [1, S] position_ids)."""
    if ids is None:
        return None
    if ids.dtype not in _ID_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {ids.dtype}")
    try:
        return ids.expand(like.shape).reshape(-1).contiguous()
    except RuntimeError as e:
        raise ValueError(f"{name} of shape {tuple(ids.shape)} does not broadcast to "
                         f"input_ids {tuple(like.shape)}") from e


def embedding_layer_norm_triton(
    input_ids: torch.Tensor,
    word_embeddings: torch.Tensor,
    position_embeddings: Optional[torch.Tensor],
    token_type_embeddings: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float = 1e-12,
    *,
    position_ids: Optional[torch.Tensor] = None,
    token_type_ids: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """``layer_norm(word[ids] + pos[position_ids] + type[token_type_ids])`` with Triton.

    Args:
        input_ids: [..., S] int32/int64 token ids (values must index ``word_embeddings``; not
            checked, which would sync the GPU).
        word_embeddings: [V, H] fp32/fp16/bf16; its dtype is the output dtype.
        position_embeddings: optional [P, H] (None for models without learned positions).
        token_type_embeddings: optional [T, H].
        weight, bias: LayerNorm parameters [H]; ``bias`` optional.
        eps: LayerNorm epsilon (BERT: 1e-12, which needs the fp32 statistics used here).
        position_ids: optional ints broadcastable to ``input_ids``; default: each token's
            index in its sequence (the last dim).
        token_type_ids: optional ints broadcastable to ``input_ids``; default: type 0.
        out: optional contiguous [..., S, H] output buffer.
        block_n: force the column tile (power of two); below H selects the looped path.

    Returns:
        [..., S, H] in ``word_embeddings.dtype``.

    Raises:
        TypeError, ValueError: bad dtypes or shapes.
        RuntimeError: tensors the current Triton mode cannot launch on.
    """
    check_dtype("word_embeddings", word_embeddings, FLOAT_DTYPES)
    if input_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    h = word_embeddings.shape[-1]
    for name, t in (("position_embeddings", position_embeddings),
                    ("token_type_embeddings", token_type_embeddings)):
        if t is not None and (t.dim() != 2 or t.shape[1] != h):
            raise ValueError(f"{name} must be [rows, {h}], got {tuple(t.shape)}")
    if weight.shape != (h,) or (bias is not None and bias.shape != (h,)):
        raise ValueError(f"weight and bias must have shape ({h},)")
    check_launchable(input_ids, word_embeddings, position_embeddings, token_type_embeddings,
                     weight, bias, position_ids, token_type_ids, out)
    out_shape = (*input_ids.shape, h)
    if out is None:
        out = torch.empty(out_shape, dtype=word_embeddings.dtype, device=word_embeddings.device)
    if out.shape != out_shape or out.dtype != word_embeddings.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {out_shape} {word_embeddings.dtype}")
    if input_ids.numel() == 0:
        return out

    ids = input_ids.reshape(-1).contiguous()
    pos_ids = _ids("position_ids", position_ids, input_ids) if position_embeddings is not None else None
    type_ids = _ids("token_type_ids", token_type_ids, input_ids) if token_type_embeddings is not None else None
    word = word_embeddings if word_embeddings.stride(-1) == 1 else word_embeddings.contiguous()
    pos_emb = position_embeddings
    if pos_emb is not None and pos_emb.stride(-1) != 1:
        pos_emb = pos_emb.contiguous()
    type_emb = token_type_embeddings
    if type_emb is not None and type_emb.stride(-1) != 1:
        type_emb = type_emb.contiguous()
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w
    y2 = out.view(-1, h)
    m = ids.numel()
    seq_len = input_ids.shape[-1] if input_ids.dim() else 1

    if block_n is None:
        block_n = row_block_n(h)
    single_tile = block_n >= h
    args = (
        ids, pos_ids if pos_ids is not None else ids, type_ids if type_ids is not None else ids,
        word, pos_emb if pos_emb is not None else word, type_emb if type_emb is not None else word,
        w, b, y2, m, h, seq_len,
        word.stride(0),
        pos_emb.stride(0) if pos_emb is not None else 0,
        type_emb.stride(0) if type_emb is not None else 0,
        y2.stride(0), eps,
    )
    meta = dict(
        HAS_POS=pos_emb is not None, HAS_POS_IDS=pos_ids is not None,
        HAS_TYPE=type_emb is not None, HAS_TYPE_IDS=type_ids is not None,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, SINGLE_TILE=single_tile,
    )
    launch_rows(_embedding_layer_norm_kernel, _embedding_layer_norm_tuned, m, args, meta, word)
    return out


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("kiln::embedding_layer_norm", mutates_args=())
def embedding_layer_norm(
    input_ids: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    token_type_ids: Optional[torch.Tensor],
    word_embeddings: torch.Tensor,
    position_embeddings: Optional[torch.Tensor],
    token_type_embeddings: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """``layer_norm(word[ids] + pos[position_ids] + type[token_type_ids])``; missing position
    ids mean 0..S-1 per sequence, missing token-type ids mean type 0. CPU runs the reference,
    CUDA Triton."""
    return embedding_layer_norm_reference(
        input_ids, word_embeddings, position_embeddings, token_type_embeddings, weight, bias, eps,
        position_ids=position_ids, token_type_ids=token_type_ids,
    )


@embedding_layer_norm.register_kernel("cuda")
def _embedding_layer_norm_cuda(input_ids, position_ids, token_type_ids, word_embeddings,
                               position_embeddings, token_type_embeddings, weight, bias, eps):
    return embedding_layer_norm_triton(
        input_ids, word_embeddings, position_embeddings, token_type_embeddings, weight, bias, eps,
        position_ids=position_ids, token_type_ids=token_type_ids,
    )


@embedding_layer_norm.register_fake
def _embedding_layer_norm_fake(input_ids, position_ids, token_type_ids, word_embeddings,
                               position_embeddings, token_type_embeddings, weight, bias, eps):
    return word_embeddings.new_empty((*input_ids.shape, word_embeddings.shape[-1]))


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def embedding_layer_norm_reference(
    input_ids: torch.Tensor,
    word_embeddings: torch.Tensor,
    position_embeddings: Optional[torch.Tensor],
    token_type_embeddings: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float = 1e-12,
    *,
    position_ids: Optional[torch.Tensor] = None,
    token_type_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain-torch embedding sum and LayerNorm with the kernel's semantics: the three rows are
    summed in fp32 (float64 stays float64) before normalizing; Hugging Face sums in the model
    dtype, which differs by about one ulp of the sum."""
    c = compute_dtype(word_embeddings.dtype)
    e = word_embeddings[input_ids].to(c)
    if position_embeddings is not None:
        if position_ids is None:
            seq_len = input_ids.shape[-1] if input_ids.dim() else 1
            position_ids = torch.arange(seq_len, device=input_ids.device)
        e = e + position_embeddings[position_ids.expand(input_ids.shape)].to(c)
    if token_type_embeddings is not None:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        e = e + token_type_embeddings[token_type_ids.expand(input_ids.shape)].to(c)
    mean = e.mean(dim=-1, keepdim=True)
    var = (e - mean).square().mean(dim=-1, keepdim=True)
    y = (e - mean) * torch.rsqrt(var + eps) * weight.to(c)
    if bias is not None:
        y = y + bias.to(c)
    return y.to(word_embeddings.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------
def embedding_layer_norm_cost(
    num_tokens: int,
    hidden: int,
    dtype: torch.dtype,
    *,
    has_position: bool = True,
    has_token_type: bool = True,
    position_ids: bool = False,
    token_type_ids: bool = True,
    has_bias: bool = True,
    id_dtype: torch.dtype = torch.int64,
    weight_dtype: Optional[torch.dtype] = None,
) -> Cost:
    """FLOPs and minimum bytes of the fused embedding + LayerNorm over ``num_tokens`` tokens.

    ``has_position``/``has_token_type``: whether those tables exist; ``position_ids``/
    ``token_type_ids``: whether id tensors for them are read. Per element: one add per extra
    table, then LayerNorm's 6 (+1 bias) (see :func:`kernels.layer_norm.layer_norm_cost`).
    Bytes: the id tensors read, one gathered row per table per token (repeated rows are not
    guaranteed to hit cache, so each counts), LayerNorm parameters, and the output.
    """
    tables = 1 + int(has_position) + int(has_token_type)
    id_tensors = 1 + int(has_position and position_ids) + int(has_token_type and token_type_ids)
    elems = num_tokens * hidden
    es = itemsize(dtype)
    flops = elems * ((tables - 1) + 6 + int(has_bias))
    nbytes = (num_tokens * id_tensors * itemsize(id_dtype)
              + elems * tables * es
              + hidden * itemsize(weight_dtype or dtype) * (1 + int(has_bias))
              + elems * es)
    return Cost(flops=flops, bytes=nbytes)


def _cost_from_args(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                    token_type_embeddings, weight, bias, eps) -> Cost:
    return embedding_layer_norm_cost(
        input_ids.numel(), word_embeddings.shape[-1], word_embeddings.dtype,
        has_position=position_embeddings is not None,
        has_token_type=token_type_embeddings is not None,
        position_ids=position_ids is not None, token_type_ids=token_type_ids is not None,
        has_bias=bias is not None, id_dtype=input_ids.dtype, weight_dtype=weight.dtype,
    )


register_cost("embedding_layer_norm", embedding_layer_norm_cost, _cost_from_args)
