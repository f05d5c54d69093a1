"""Minimum bytes an op moves to and from memory, for arithmetic intensity and the roofline.

The rule (kiln_kernels/cost.py uses the same): every input read once at its stored size (a
broadcast input, stride 0 along a dim, is read once, not once per use), every output written
once. Views move nothing. Lookups (embedding, index_select, gather) read the rows they return,
not the whole table. Creation ops only write. Real kernels may move more (re-reads, spills);
measured time against this minimum is what the roofline fraction shows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import _pytree as pytree

# Lookups: read the indices and the gathered rows (= the output's size), write the output.
_GATHERS = {"embedding", "index_select", "index", "gather", "_unsafe_index", "take"}
# Ops that write their output without reading any tensor data.
_WRITE_ONLY = {
    "zeros", "ones", "full", "arange", "linspace", "zeros_like", "ones_like", "full_like", "new_zeros",
    "new_ones", "new_full", "scalar_tensor", "rand", "randn", "randint", "rand_like", "randn_like", "fill", "zero",
}
# Allocation without initialisation, and shape/stride queries: no traffic at all.
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
               "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "size", "stride", "numel", "dim"}


def numel(t: Any) -> int:
    """Elements of a tensor (0 for anything else)."""
    return int(t.numel()) if isinstance(t, torch.Tensor) else 0


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes `t`'s elements occupy in memory: dims with stride 0 (broadcasts) count once."""
    try:
        elems = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0 or s == 0)
        return int(elems) * t.element_size()
    except (RuntimeError, NotImplementedError):  # sparse / nested layouts have no strides
        return numel(t) * t.element_size()


def _tensors(value: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _is_view(func: torch._ops.OpOverload) -> bool:
    """True when every return aliases an input without writing it (a view)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def op_bytes(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """Minimum bytes moved by one call of `func` (see the module docstring)."""
    op = func._schema.name.partition("::")[2]
    if op.endswith("_") and not op.endswith("__"):  # in-place variant: same traffic rule
        op = op[:-1]
    outputs = _unique(_tensors(out))
    written = sum(stored_bytes(t) for t in outputs)
    if _is_view(func):
        return 0
    if op in _NO_TRAFFIC:
        return 0
    if op in _WRITE_ONLY:
        return written
    inputs = _unique(_tensors((args, kwargs)))
    input_ids = {id(t) for t in inputs}
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
    if outputs and not writes and all(id(t) in input_ids for t in outputs):
        return 0  # returned its input unchanged (dropout in eval, contiguous on a contiguous tensor)
    if op in _GATHERS:
        indices = [t for t in inputs if not t.is_floating_point()]
        return sum(stored_bytes(t) for t in indices) + 2 * written
    if op == "copy":  # copy_(dst, src): dst is written, not read
        src = inputs[1:] if len(inputs) > 1 else inputs
        return sum(stored_bytes(t) for t in src) + written
    # an in-place op returns its input: it is read once and written once, like any other
    return sum(stored_bytes(t) for t in inputs) + written


__all__ = ["op_bytes", "stored_bytes", "numel"]
