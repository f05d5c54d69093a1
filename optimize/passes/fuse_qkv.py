"""QKV fusion: linears that read the same input become one GEMM over the concatenated weights,
split back into their outputs.

The query, key and value projections of an attention block (and the gate/up projections of a
gated MLP) are three launches that each read the same activations; one [in, 3 * out] GEMM reads
them once and keeps the tensor cores busier at small batch. The split is three views, no copy.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import ClassVar

import torch
from torch import fx

from optimize.passes.base import GraphPass, PassContext, add_constant, attr_tensor, aten
from optimize.passes.matching import LinearMatch, emit_linear, match_linear, release_attrs


class FuseQKV(GraphPass):
    name: ClassVar[str] = "fuse_qkv"
    description: ClassVar[str] = "linears sharing one input → one GEMM + split"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        groups: dict[tuple, list[LinearMatch]] = defaultdict(list)
        for node in list(gm.graph.nodes):
            m = match_linear(gm, node)
            if m is None:
                continue
            w = attr_tensor(gm, m.weight)
            assert w is not None
            in_features = w.shape[0] if m.weight_in_out else w.shape[1]
            key = (m.x, m.node.target, m.weight_in_out, in_features, w.dtype, m.bias is None)
            groups[key].append(m)
        counts = {"groups": 0, "linears": 0}
        replaced: list[str] = []
        for members in groups.values():
            if len(members) < 2:
                continue
            _fuse(gm, members)
            counts["groups"] += 1
            counts["linears"] += len(members)
            replaced += [str(m.weight.target) for m in members]
            replaced += [str(m.bias.target) for m in members if m.bias is not None]
        release_attrs(gm, replaced)
        return counts


def _fuse(gm: fx.GraphModule, members: list[LinearMatch]) -> None:
    first = members[0]
    out_dim = 1 if first.weight_in_out else 0
    weights = [attr_tensor(gm, m.weight) for m in members]
    sizes = [int(w.shape[out_dim]) for w in weights]  # type: ignore[union-attr]
    weight = add_constant(gm, "_kiln_qkv_weight", torch.cat(weights, dim=out_dim), first.node)  # type: ignore[arg-type]
    bias = None
    if first.bias is not None:
        biases = [attr_tensor(gm, m.bias) for m in members]
        bias = add_constant(gm, "_kiln_qkv_bias", torch.cat(biases), first.node)  # type: ignore[arg-type]
    with gm.graph.inserting_before(first.node):
        fused = emit_linear(gm.graph, first, weight, bias)
        parts = gm.graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
    with gm.graph.inserting_after(parts):
        items = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    for m, item in zip(members, items):
        m.node.replace_all_uses_with(item)
        gm.graph.erase_node(m.node)
