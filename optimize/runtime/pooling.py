"""Sentence-transformers pooling in torch, for engines whose payload returns token states only
(CTranslate2) and for the Hugging Face source that compiles pooling into the graph."""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """sentence-transformers pooling of [batch, seq, hidden] token states over the real tokens
    (`attention_mask` 1): "mean", "max", "cls" (the first token) or "last" (the last real token,
    wherever padding is: decoders used as embedders pad left or right); fp32, L2-normalized when
    `normalize`. Engines that cannot compile the pooling into their graph apply it with this."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "last":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(dim=1)  # index of the last 1 in each row
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    elif pooling == "mean":
        # clamp: an all-padding row pools to zeros instead of NaN
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    elif pooling == "max":
        pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    else:
        pooled = hidden[:, 0]
    pooled = pooled.float()
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1) if normalize else pooled


__all__ = ["pool"]
