"""Constant folding: evaluate once, at compile time, every node whose inputs are all weights
or constants (e.g. transposed or reshaped weights, masks built from constant shapes)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import fx

from optimize.passes.base import GraphPass, PassContext, add_constant, attr_tensor

# Ops never folded: folding them would bake in randomness or grow the weights a lot.
_NEVER = {torch.ops.aten.rand.default, torch.ops.aten.randn.default, torch.ops.aten.dropout.default,
          torch.ops.aten.expand.default, torch.ops.aten.expand_as.default}
_MAX_GROWTH = 4  # a folded constant may be at most 4x larger than the inputs it replaces


class FoldConstants(GraphPass):
    name: ClassVar[str] = "fold_constants"
    description: ClassVar[str] = "precompute nodes whose inputs are all constants"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        values: dict[fx.Node, torch.Tensor] = {}
        folded = 0
        for node in list(gm.graph.nodes):
            if node.op == "get_attr":
                tensor = attr_tensor(gm, node)
                if tensor is not None:
                    values[node] = tensor
                continue
            if node.op != "call_function" or node.target in _NEVER or not _is_pure(node.target):
                continue
            inputs = node.all_input_nodes
            if not inputs or not all(a in values for a in inputs):
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: values[a])
            with torch.no_grad():
                result = node.target(*args, **kwargs)
            if not isinstance(result, torch.Tensor):
                continue
            if result.numel() > _MAX_GROWTH * max(sum(values[a].numel() for a in inputs), 1):
                continue
            replacement = add_constant(gm, "_kiln_folded", result, node)
            replacement.meta = dict(node.meta)
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
            values[replacement] = result
            folded += 1
        return {"folded": folded}


def _is_pure(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    return (schema is not None and not schema.is_mutable and len(schema.returns) == 1
            and isinstance(schema.returns[0].type, torch.TensorType))
