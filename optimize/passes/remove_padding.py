"""Padding removal: the layers of a masked transformer run on packed tokens, so the engine does
work in proportion to the real tokens of a batch, not to batch x longest sequence.

At the first layer the real tokens of the [batch, seq, ...] activations are gathered into one
row each (`kiln_cuda.pack_indices` on the attention mask: token indices and FlashAttention's
`cu_seqlens`), every per-token op (linears, norms, GELU, residual adds, head reshapes) runs on
[1, tokens, ...] instead of [batch, seq, ...], attention runs as `kiln.attention_varlen`
over the sequences that `cu_seqlens` delimits, and the padded layout is restored
(`kiln_cuda.scatter_rows`, zeros at padding) only where a value leaves the packed region:
at the outputs, or at an op that is not per-token, such as a pooling sum over the sequence.

Packing keeps every tensor's rank (padded [B, S, F] becomes [1, T, F], a flattened [B*S, F]
becomes [T, F]), so ops keep their dims and only shape arguments are rewritten. An op joins
the packed region when its data inputs have the token layout, its other tensor inputs are
weights that broadcast over features only, and its dims are feature dims; regions that contain
no attention are left alone. Requires attention fused into `kiln.attention` with one key
mask for all layers (see fuse_attention); a padding position of a token output is zero in the
result, which is not part of the model's contract (see `optimize.verify`).

A padding position that the model reads outside the packed region is computed, not zeroed:
BERT's and RoBERTa's pooler (and CLS pooling) read token 0 (`select(h, 1, 0)`), which is
padding in a left-padded row, and the eager model pools whatever the encoder computed there (a
padded query attends to the row's real keys). Such positions are packed as extra query-only
tokens after the real ones: every per-token op runs on them, and attention runs them as a
second `attention_varlen` call against the real keys of their row, so they never act as keys.
Right-padded batches have none; the second call then has no queries. Only for non-causal
attention: a causal model that reads a fixed position is not packed.

The triton backend derives from this graph a second entry point that takes batches already
packed (`optimize.passes.packed_entry`): there the pack, the scatter and the extra tokens go.
"""

from __future__ import annotations

import operator
from typing import Any, ClassVar

import torch
from torch import fx

from optimize.passes.base import GraphPass, PassContext, aten, call_nodes
from optimize.passes.matching import ensure_meta, expr, is_static, kernel_ops, native_ops, shape_of, token_dims, value

_POINTWISE = {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.gelu.default, aten.tanh.default, aten.erf.default,
    aten.pow.Tensor_Scalar, aten.relu.default, aten.silu.default, aten.sigmoid.default, aten.neg.default,
    aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.clamp.default, aten.clamp_min.default,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
    aten.alias.default, aten.detach.default, aten.dropout.default,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# ops with a dim argument (position) that must name a feature dim
_DIM_OPS = {
    aten.split.Tensor: 2, aten.split_with_sizes.default: 2, aten.chunk.default: 2, aten.unsqueeze.default: 1,
    aten.squeeze.dim: 1, aten.select.int: 1, aten.slice.Tensor: 1, aten.narrow.default: 1, aten.softmax.int: 1,
    aten._softmax.default: 1,
}


class RemovePadding(GraphPass):
    name: ClassVar[str] = "remove_padding"
    description: ClassVar[str] = "encoder layers on packed tokens (cu_seqlens); padding restored at the outputs"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        ops = kernel_ops()
        attention = call_nodes(gm, ops.attention.default)
        counts = {"packed_attention": 0, "packed_ops": 0, "gathered": 0, "restored": 0, "read_positions": 0}
        if not attention:
            return counts
        ensure_meta(gm)
        mask = attention[0].args[3]
        if not isinstance(mask, fx.Node) or any(a.args[3] is not mask for a in attention):
            return counts  # no key mask, or several: nothing (single) to pack by
        mask_shape = shape_of(mask)
        if mask_shape is None or len(mask_shape) != 2 or is_static(mask_shape):
            return counts
        layout = _Layout(gm, expr(mask_shape[0]), expr(mask_shape[1]))
        region = _region(gm, layout, mask, ops)
        if not any(a in region for a in attention):
            return counts
        return _rewrite(gm, region, layout, mask, ops, native_ops())


class _Layout:
    """Which dims of a padded value are token dims (2 for [B, S, ...], 1 for [B*S, ...]), and
    which values are constants (computed from weights alone, never from the inputs)."""

    def __init__(self, gm: fx.GraphModule, batch: Any, seq: Any) -> None:
        self.batch, self.seq = batch, seq
        self.from_inputs: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if node.op == "placeholder" or any(a in self.from_inputs for a in node.all_input_nodes):
                self.from_inputs.add(node)

    def token_dims(self, node: Any) -> int | None:
        """2 for a [B, S, ...] value, 1 for [B*S, ...], None for anything else."""
        return token_dims(node, self.batch, self.seq)

    def is_param(self, node: Any, rank_limit: int | None = None) -> bool:
        """A constant (a weight, or computed from weights) of rank <= `rank_limit`."""
        shape = shape_of(node)
        return node not in self.from_inputs and shape is not None and is_static(shape) and (
            rank_limit is None or len(shape) <= rank_limit)


def _dim(arg: Any, rank: int) -> int | None:
    return arg % rank if isinstance(arg, int) and rank else None


def _packable(node: fx.Node, layout: _Layout, inside: set[fx.Node], mask: fx.Node, ops: Any) -> bool:
    """True when `node` computes each token from that token alone (so it can run packed)."""
    target = node.target
    tokens = layout.token_dims(node)
    tensors = [a for a in node.all_input_nodes if isinstance(value(a), torch.Tensor)
               or isinstance(value(a), (list, tuple))]

    if target is operator.getitem:
        return node.args[0] in inside
    if target is ops.attention.default:
        q, k, v = node.args[:3]
        return all(layout.token_dims(t) == 2 for t in (q, k, v)) and node.args[3] is mask
    if tokens is None:
        return False
    if target in _POINTWISE:
        rank = len(shape_of(node) or ())
        if not any(layout.token_dims(a) == tokens for a in tensors):
            return False
        features = rank - tokens
        return all(layout.token_dims(a) == tokens or layout.is_param(a, features) for a in tensors)
    if target in _RESHAPES:
        out = shape_of(node) or ()
        return layout.token_dims(node.args[0]) is not None and is_static(out[tokens:])
    if target in _DIM_OPS:
        x = node.args[0]
        in_tokens = layout.token_dims(x)
        rank = len(shape_of(x) or ())
        if target is aten.unsqueeze.default:
            rank += 1
        pos = _DIM_OPS[target]
        dim = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", 0)
        d = _dim(dim, rank)
        return in_tokens is not None and d is not None and d >= in_tokens and all(
            layout.is_param(a) for a in tensors if a is not x)
    if target is aten.transpose.int:
        x = node.args[0]
        t, rank = layout.token_dims(x), len(shape_of(x) or ())
        return t is not None and all((_dim(d, rank) or 0) >= t for d in node.args[1:3])
    if target is aten.permute.default:
        x = node.args[0]
        t = layout.token_dims(x)
        return t is not None and list(node.args[1][:t]) == list(range(t))  # type: ignore[index]
    row_data = _ROW_DATA.get(target) or _kernel_row_data(target, ops)
    if row_data is not None:
        xs = [node.args[i] for i in row_data if i < len(node.args)]
        t = layout.token_dims(xs[0])
        if t is None or any(layout.token_dims(x) != t for x in xs):
            return False
        return all(layout.is_param(a) for a in tensors if a not in xs)
    return False


# op -> positions of its per-token data arguments (other tensor arguments are weights)
_ROW_DATA = {
    aten.linear.default: (0,), aten.addmm.default: (1,), aten.mm.default: (0,), aten.matmul.default: (0,),
    aten.layer_norm.default: (0,),
}


def _kernel_row_data(target: Any, ops: Any) -> tuple[int, ...] | None:
    table = {
        ops.layer_norm.default: (0,), ops.add_layer_norm.default: (0, 1), ops.rms_norm.default: (0,),
        ops.add_rms_norm.default: (0, 1), ops.bias_gelu.default: (0,), ops.int8_weight_linear.default: (0,),
    }
    return table.get(target)


def _region(gm: fx.GraphModule, layout: _Layout, mask: fx.Node, ops: Any) -> set[fx.Node]:
    """The packable nodes connected (through packable nodes) to an attention node."""
    candidates: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and _packable(node, layout, candidates, mask, ops):
            candidates.add(node)
    # Ancestors and descendants of attention through packable nodes: side branches (a mask
    # unsqueezed for pooling) stay padded and are gathered where the packed path reads them,
    # instead of being packed and then restored for their other readers.
    attention = [n for n in candidates if n.target is ops.attention.default]
    region: set[fx.Node] = set()
    for walk in (lambda n: n.all_input_nodes, lambda n: list(n.users)):
        seen: set[fx.Node] = set()
        stack = list(attention)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(m for m in walk(n) if m in candidates and m not in seen)
        region |= seen
    # getitems of a packed tuple live and die with it
    for n in list(region):
        if n.target is not operator.getitem:
            for user in n.users:
                if user.target is operator.getitem:
                    region.add(user)
    return region


def _read_positions(region: set[fx.Node], layout: _Layout) -> set[int]:
    """Token positions read outside the region at a fixed index (`h[:, 0]`: a pooler, CLS
    pooling); negative indices count from the end of the sequence."""
    reads = set()
    for node in region:
        if layout.token_dims(node) != 2:
            continue
        for user in node.users:
            if user not in region and user.target is aten.select.int and user.args[0] is node \
                    and user.args[1] in (1, 1 - len(shape_of(node) or ())) and isinstance(user.args[2], int):
                reads.add(user.args[2])
    return reads


def _rewrite(gm: fx.GraphModule, region: set[fx.Node], layout: _Layout, mask: fx.Node, ops: Any,
             native: Any) -> dict[str, int]:
    counts = {"packed_attention": 0, "packed_ops": 0, "gathered": 0, "restored": 0, "read_positions": 0}
    g = gm.graph
    order = [n for n in g.nodes if n in region]
    reads = sorted(_read_positions(region, layout))
    attention = [n for n in order if n.target is ops.attention.default]
    if reads and any(len(a.args) > 4 and a.args[4] for a in attention):
        return counts  # a causal padded query sees the real keys before it only: not one varlen call
    first = order[0]
    with g.inserting_before(first):
        key_mask = g.call_function(aten.contiguous.default, (mask,))
        packing = g.call_function(native.pack_indices.default, (key_mask,))
        token_index = g.call_function(operator.getitem, (packing, 0))
        cu_seqlens = g.call_function(operator.getitem, (packing, 1))
        batch = g.call_function(aten.sym_size.int, (mask, 0))
        seq = g.call_function(aten.sym_size.int, (mask, 1))
        real_tokens = g.call_function(aten.sym_size.int, (token_index, 0))
        extra = None
        if reads:
            # padding positions read outside: query-only tokens packed after the real ones
            positions = g.call_function(aten.arange.default, (seq,), {"device": value(mask).device})
            wanted = None
            for r in reads:
                index = r if r >= 0 else g.call_function(operator.add, (seq, r))
                at = g.call_function(aten.eq.Scalar, (positions, index))
                wanted = at if wanted is None else g.call_function(aten.logical_or.default, (wanted, at))
            padding = g.call_function(aten.eq.Scalar, (key_mask, 0))
            read_padding = g.call_function(aten.logical_and.default, (padding, wanted))
            extra = g.call_function(native.pack_indices.default, (read_padding,))
            extra_index = g.call_function(operator.getitem, (extra, 0))
            extra_cu = g.call_function(operator.getitem, (extra, 1))
            extra_tokens = g.call_function(aten.sym_size.int, (extra_index, 0))
            token_index = g.call_function(aten.cat.default, ([token_index, extra_index],))
            counts["read_positions"] = len(reads)
        tokens = g.call_function(aten.sym_size.int, (token_index, 0))
    packed: dict[fx.Node, fx.Node] = {}
    gathered: dict[fx.Node, fx.Node] = {}

    def pack_input(a: fx.Node) -> fx.Node:
        if a in packed:
            return packed[a]
        t = layout.token_dims(a)
        if t is None:
            return a  # a weight
        if a not in gathered:  # inserted before the packed op being built, so after pack_indices
            x = a
            if t == 1:  # [B*S, F] → [B, S, F]
                x = g.call_function(aten.view.default, (x, [batch, seq, *shape_of(a)[1:]]))  # type: ignore[index]
            x = g.call_function(aten.contiguous.default, (x,))
            rows = g.call_function(native.gather_rows.default, (x, token_index))
            gathered[a] = g.call_function(aten.unsqueeze.default, (rows, 0)) if t == 2 else rows
            counts["gathered"] += 1
        return gathered[a]

    for node in order:
        t = layout.token_dims(node)
        with g.inserting_before(node):
            if node.target is ops.attention.default:
                q, k, v = (g.call_function(aten.select.int, (pack_input(x), 0, 0)) for x in node.args[:3])
                causal = node.args[4] if len(node.args) > 4 else False
                scale = node.args[5] if len(node.args) > 5 else None
                if extra is None:
                    out = g.call_function(ops.attention_varlen.default,
                                          (q, k, v, cu_seqlens, cu_seqlens, seq, seq, causal, scale))
                else:  # real queries and keys, then the read padding positions as queries only
                    q, q_extra, k, v = (
                        g.call_function(operator.getitem, (
                            g.call_function(aten.split_with_sizes.default, (x, [real_tokens, extra_tokens])), i))
                        for x, i in ((q, 0), (q, 1), (k, 0), (v, 0)))
                    out = g.call_function(aten.cat.default, ([
                        g.call_function(ops.attention_varlen.default,
                                        (q, k, v, cu_seqlens, cu_seqlens, seq, seq, causal, scale)),
                        g.call_function(ops.attention_varlen.default,
                                        (q_extra, k, v, extra_cu, cu_seqlens, len(reads), seq, causal, scale)),
                    ],))
                new = g.call_function(aten.unsqueeze.default, (out, 0))
                counts["packed_attention"] += 1
            elif node.target in _RESHAPES:
                features = list(shape_of(node)[t:])  # type: ignore[index]
                size = [1, tokens, *features] if t == 2 else [tokens, *features]
                new = g.call_function(node.target, (pack_input(node.args[0]), size))
            else:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), pack_input)
                new = g.call_function(node.target, args, kwargs)
        new.meta["kiln_packed_from"] = node.name
        packed[node] = new
        counts["packed_ops"] += 1

    for node in order:
        outside = [u for u in node.users if u not in region]
        if not outside:
            continue
        t = layout.token_dims(node)
        asserts = [u for u in outside if u.target is aten._assert_tensor_metadata.default]
        for u in asserts:  # dtype/device/layout checks hold for the packed value too
            u.replace_input_with(node, packed[node])
        outside = [u for u in outside if u not in asserts]
        if not outside:
            continue
        if t is None:
            raise AssertionError(f"packed value {node.name} without token layout leaves the region")
        with g.inserting_before(node):  # right after the packed op, before any outside reader
            rows = packed[node]
            if t == 2:
                rows = g.call_function(aten.select.int, (rows, 0, 0))
            rows = g.call_function(aten.contiguous.default, (rows,))
            restored = g.call_function(native.scatter_rows.default, (rows, token_index, batch, seq))
            if t == 1:
                features = list((shape_of(node) or ())[1:])
                restored = g.call_function(aten.view.default, (restored, [-1, *features]))
        for u in outside:
            u.replace_input_with(node, restored)
        counts["restored"] += 1
    g.eliminate_dead_code()
    counts["packed_ops"] -= counts["packed_attention"]
    return counts
