"""Remove dropout and identity ops: inference never drops, and each no-op node removed is one
less kernel launch (or at least one less node for the backend to schedule)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx

from optimize.passes.base import GraphPass, PassContext, aten, call_nodes

DROPOUTS = (aten.dropout.default, aten.alpha_dropout.default, aten.feature_dropout.default)
# Ops that return their input unchanged when the result has the input's dtype, shape and strides.
# (clone is left alone: it may protect a buffer from a later in-place op.)
IDENTITIES = (aten.alias.default, aten.detach.default, aten.contiguous.default, aten.to.dtype)


class RemoveDropout(GraphPass):
    name: ClassVar[str] = "remove_dropout"
    description: ClassVar[str] = "drop dropout and identity ops (alias, detach, no-op casts)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        counts = {"dropout": 0, "identity": 0}
        for node in call_nodes(gm, *DROPOUTS):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            counts["dropout"] += 1
        for node in call_nodes(gm, *IDENTITIES):
            source = node.args[0]
            if isinstance(source, fx.Node) and _same_tensor_meta(source, node):
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                counts["identity"] += 1
        return counts


def _same_tensor_meta(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype
            and va.device == vb.device and va.shape == vb.shape and va.stride() == vb.stride())
