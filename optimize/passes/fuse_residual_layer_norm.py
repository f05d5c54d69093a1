"""Residual + LayerNorm fusion: `layer_norm(a + b)` becomes one `kiln.add_layer_norm`, which
returns the normalized rows and the sum (the sum is the next residual in pre-LN models such as
GPT-2, so it is written once instead of written, read back and written again).

Only same-shape sums are fused: a broadcast add (GPT-2's token + [1, S] position embeddings)
is not a residual connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import fx

from optimize.passes.base import GraphPass, PassContext, attr_tensor, aten, call_nodes
from optimize.passes.matching import (
    dtype_of,
    ensure_meta,
    is_call,
    kernel_ops,
    ones_like_weight,
    replace_with_items,
    same_shape,
    shape_of,
)


def layer_norm_args(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None, fx.Node | None, float] | None:
    """(input, weight, bias, eps) of an `aten.layer_norm` over the last dim with constant
    affine parameters (either may be absent), else None."""
    if not is_call(node, aten.layer_norm.default):
        return None
    args = list(node.args) + [None] * (5 - len(node.args))
    x, normalized_shape, weight, bias, eps = args[:5]
    eps = node.kwargs.get("eps", 1e-5 if eps is None else eps)
    weight = node.kwargs.get("weight", weight)
    bias = node.kwargs.get("bias", bias)
    shape = shape_of(x)
    if shape is None or len(normalized_shape) != 1 or isinstance(shape[-1], torch.SymInt) \
            or int(normalized_shape[0]) != shape[-1]:
        return None
    for p in (weight, bias):
        if p is not None and attr_tensor(gm, p) is None:
            return None
    return x, weight, bias, float(eps)


def layer_norms(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, fx.Node, fx.Node | None, fx.Node | None, float]]:
    """(norm, input, weight, bias, eps) of each LayerNorm of `gm` that `layer_norm_args`
    accepts, in graph order; the nodes are listed first, so the caller may rewrite as it goes."""
    for node in call_nodes(gm, aten.layer_norm.default):
        parsed = layer_norm_args(gm, node)
        if parsed is not None:
            yield (node, *parsed)


class FuseResidualLayerNorm(GraphPass):
    name: ClassVar[str] = "fuse_residual_layer_norm"
    description: ClassVar[str] = "residual add + LayerNorm → kiln.add_layer_norm"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        ensure_meta(gm)
        ops = kernel_ops()
        fused = 0
        for node, s, weight, bias, eps in layer_norms(gm):
            if not is_call(s, aten.add.Tensor) or s.kwargs.get("alpha", 1) != 1:
                continue
            a, b = s.args[:2]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and same_shape(a, b) and same_shape(a, s)
                    and dtype_of(a) == dtype_of(b) == dtype_of(s)):
                continue
            if weight is None:
                weight = ones_like_weight(gm, shape_of(s)[-1], dtype_of(s), s)  # type: ignore[index,arg-type]
            # at the add, not the norm: the sum may have readers before the norm
            with gm.graph.inserting_after(s):
                both = gm.graph.call_function(ops.add_layer_norm.default, (a, b, weight, bias, eps))
            replace_with_items(gm, both, [node, s])
            gm.graph.erase_node(node)
            gm.graph.erase_node(s)
            fused += 1
        return {"add_layer_norm": fused}
