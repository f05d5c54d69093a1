"""Embedding + LayerNorm fusion: `layer_norm(word[ids] + position[pos] + type[types])` becomes one
`kiln.embedding_layer_norm` that gathers the rows, sums them in fp32 and normalizes, without
writing the three lookups and their sums to memory (BERT's embedding block: six ops, one kernel).

Matched when the sum feeds nothing but the norm (in GPT-2 it is also the first residual and
stays as it is).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx

from optimize.passes.base import GraphPass, PassContext, attr_tensor, aten
from optimize.passes.fuse_residual_layer_norm import layer_norms
from optimize.passes.matching import (
    dtype_of,
    ensure_meta,
    erase_dead,
    expr,
    is_call,
    kernel_ops,
    ones_like_weight,
    shape_of,
)

_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)


class FuseEmbeddingLayerNorm(GraphPass):
    name: ClassVar[str] = "fuse_embedding_layer_norm"
    description: ClassVar[str] = "sum of embedding lookups + LayerNorm → kiln.embedding_layer_norm"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        ensure_meta(gm)
        ops = kernel_ops()
        fused = 0
        for node, s, weight, bias, eps in layer_norms(gm):
            lookups = _lookups(gm, s, dtype_of(node))
            if lookups is None:
                continue
            word_ids, word = lookups[0]
            rest = lookups[1:] + [(None, None)] * (3 - len(lookups))
            (pos_ids, pos), (type_ids, types) = rest
            if weight is None:
                weight = ones_like_weight(gm, shape_of(node)[-1], dtype_of(node), node)  # type: ignore[index,arg-type]
            with gm.graph.inserting_before(node):
                out = gm.graph.call_function(ops.embedding_layer_norm.default, (
                    word_ids, pos_ids, type_ids, word, pos, types, weight, bias, eps))
            node.replace_all_uses_with(out)
            erase_dead(gm, [node])
            fused += 1
        return {"embedding_layer_norm": fused}


def _lookups(gm: fx.GraphModule, s: object, dtype: torch.dtype | None) -> list[tuple[fx.Node, fx.Node]] | None:
    """[(ids, table), ...] when `s` is a sum of 1 to 3 embedding lookups of constant tables,
    the full-shape ids first, every other id tensor broadcastable to them; the sum's nodes
    must feed nothing else. None otherwise."""
    leaves: list[fx.Node] = []
    stack = [s]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or len(n.users) != 1:
            return None
        if is_call(n, aten.add.Tensor) and n.kwargs.get("alpha", 1) == 1:
            stack.extend(n.args[:2])
        elif is_call(n, *_CASTS) and dtype_of(n) == dtype_of(n.args[0]):
            stack.append(n.args[0])
        elif is_call(n, aten.embedding.default):
            leaves.append(n)
        else:
            return None
    if not 1 <= len(leaves) <= 3:
        return None
    out = []
    for leaf in leaves:
        table, ids = leaf.args[:2]
        t = attr_tensor(gm, table)
        if t is None or t.dim() != 2 or t.dtype != dtype or dtype_of(ids) not in (torch.int32, torch.int64):
            return None
        out.append((ids, table))
    full = shape_of(s)[:-1]  # type: ignore[index]
    # the word table: full-shape ids, the largest table (the roles only name the kernel's
    # arguments; every lookup is explicit, so the sum is the same in any order)
    out.sort(key=lambda pair: (not _same(shape_of(pair[0]), full), -attr_tensor(gm, pair[1]).shape[0]))
    if not _same(shape_of(out[0][0]), full):
        return None
    for ids, _ in out[1:]:
        shape = shape_of(ids)
        if shape is None or len(shape) != len(full) or any(
                expr(a) != expr(b) and expr(a) != 1 for a, b in zip(shape, full)):
            return None
    return out  # type: ignore[return-value]


def _same(a: tuple | None, b: tuple) -> bool:
    return a is not None and len(a) == len(b) and all(expr(x) == expr(y) for x, y in zip(a, b))
