"""Attention fusion: `scaled_dot_product_attention`, and the explicit
matmul → scale → mask → softmax → matmul chain, become one `kiln.attention` call (the
FlashAttention-style kernel: the S x S score matrix never reaches memory).

The kernel takes a [batch, key] padding mask and a causal flag instead of an arbitrary
[batch, heads, query, key] mask, so each mask in the graph is classified first: its subgraph
is evaluated on random probe inputs (random padding patterns) and compared with "padding only"
and "padding and causal". The meaning of a mask is established by what it computes, not by how
a given transformers version happens to build it. When the padding pattern equals an input
(Hugging Face's `attention_mask`) the kernel reads that input directly and the mask subgraph
becomes dead code; attention whose mask is anything else is left as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from optimize.passes.base import GraphPass, PassContext, aten, call_nodes
from optimize.passes.matching import (
    bound_args,
    dtype_of,
    ensure_meta,
    erase_dead,
    evaluate,
    expr,
    is_call,
    kernel_ops,
    number,
    probe_feeds,
    scaled,
    shape_of,
    single_user,
)

_SOFTMAXES = (aten.softmax.int, aten._softmax.default)
_MAX_HEAD_DIM = 256  # kiln_kernels.attention's limit
# An additive mask hides a key when it adds at most this much (HF: finfo.min; old BERT: -10000).
_HIDDEN_BELOW = -1e4


@dataclass(frozen=True)
class MaskMeaning:
    """What a mask computes: optional key padding (`key_mask`, True = real key) plus causality."""

    causal: bool
    key_mask: fx.Node | None  # an input whose nonzeros mark real keys; None = no padding
    from_mask: bool = False  # True: the padding row must be sliced out of the mask itself


class MaskClassifier:
    """Classifies mask nodes by evaluating them on probe inputs (cached per node)."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.gm = gm
        self.feeds = probe_feeds(ctx.inputs, seed=ctx.config.seed)
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.cache: dict[tuple[fx.Node, str], MaskMeaning | None] = {}

    def classify(self, mask: fx.Node, kind: str) -> MaskMeaning | None:
        """`kind`: "bool" (True = attend), "additive" (0 = attend), "fill" (True = hidden)."""
        key = (mask, kind)
        if key not in self.cache:
            try:
                self.cache[key] = self._classify(mask, kind)
            except Exception:  # a mask we cannot evaluate on probes is a mask we do not fuse
                self.cache[key] = None
        return self.cache[key]

    def _visible(self, mask: fx.Node, kind: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor | None:
        m = evaluate(self.gm, mask, feeds)
        if not isinstance(m, torch.Tensor):
            return None
        if kind == "additive":
            if m.dtype == torch.bool or not bool(((m == 0) | (m <= _HIDDEN_BELOW)).all()):
                return None  # a bias (ALiBi, relative positions), not a mask
            v = m == 0
        elif kind == "fill":
            v = ~m.bool()
        else:
            if m.dtype != torch.bool:
                return None
            v = m
        while v.dim() < 4:
            v = v.unsqueeze(0)
        return v

    def _classify(self, mask: fx.Node, kind: str) -> MaskMeaning | None:
        causal_votes, rows = set(), []
        for feeds in self.feeds:
            v = self._visible(mask, kind, feeds)
            if v is None or v.dim() != 4:
                return None
            if not bool((v == v[:, :1]).all()):
                return None  # differs between heads
            sq, sk = v.shape[-2:]
            row = v[:, 0, -1, :]  # the last query sees every real key under either meaning
            padding = row[:, None, None, :].expand_as(v)
            tri = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
            if bool((v == padding).all()):
                causal_votes.add(False)
            elif bool((v == (padding & tri)).all()):
                causal_votes.add(True)
            else:
                return None
            rows.append(row)
        if len(causal_votes) != 1:
            return None
        causal = causal_votes.pop()
        if all(bool(r.all()) for r in rows):
            # no padding on random inputs; with every integer input zero (an all-padding
            # mask, if one of them is a mask) still none: the mask ignores the inputs
            zeros = {k: torch.zeros_like(t) if not t.is_floating_point() else t for k, t in self.feeds[0].items()}
            v = self._visible(mask, kind, zeros)
            if v is None or not bool(v[:, :, -1, :].all()):
                return None
            return MaskMeaning(causal, None)
        for p in self.placeholders:
            if p.meta["val"].is_floating_point():
                continue
            if all(_same_padding(f.get(str(p.target)), r) for f, r in zip(self.feeds, rows)):
                return MaskMeaning(causal, p)
        return MaskMeaning(causal, None, from_mask=True)


def _same_padding(candidate: torch.Tensor | None, row: torch.Tensor) -> bool:
    return candidate is not None and candidate.shape == row.shape and bool(((candidate != 0) == row).all())


class FuseAttention(GraphPass):
    name: ClassVar[str] = "fuse_attention"
    description: ClassVar[str] = "SDPA and matmul→scale→mask→softmax→matmul → kiln.attention"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        ensure_meta(gm)
        ops = kernel_ops()
        masks = MaskClassifier(gm, ctx)
        counts = {"sdpa": 0, "explicit": 0}
        for node in call_nodes(gm, aten.scaled_dot_product_attention.default):
            if _fuse_sdpa(gm, node, masks, ops):
                counts["sdpa"] += 1
        for node in call_nodes(gm, *_SOFTMAXES):
            if node.graph is gm.graph and _fuse_explicit(gm, node, masks, ops):
                counts["explicit"] += 1
        gm.graph.eliminate_dead_code()
        return counts


def _heads_ok(q: fx.Node, k: fx.Node, v: fx.Node) -> bool:
    sq, sk, sv = shape_of(q), shape_of(k), shape_of(v)
    if sq is None or sk is None or sv is None or not len(sq) == len(sk) == len(sv) == 4:
        return False
    d = sq[-1]
    if isinstance(d, torch.SymInt) or not 0 < d <= _MAX_HEAD_DIM or expr(sk[-1]) != d or expr(sv[-1]) != d:
        return False
    hq, hk = sq[1], sk[1]
    if isinstance(hq, torch.SymInt) or isinstance(hk, torch.SymInt) or hq % hk:
        return False  # the kernel takes grouped-query heads: Hq a multiple of Hkv
    floats = (torch.float32, torch.float16, torch.bfloat16)
    return expr(sk[2]) == expr(sv[2]) and all(dtype_of(t) in floats for t in (q, k, v))


def _bshd(gm: fx.GraphModule, x: fx.Node) -> fx.Node:
    """x [B, H, S, D] as [B, S, H, D]: the transpose's input when x is itself a transpose of
    dims 1 and 2 (how HF splits heads), else a new transpose (a view; the kernel takes strides)."""
    if is_call(x, aten.transpose.int) and sorted(d % 4 for d in x.args[1:3]) == [1, 2]:
        return x.args[0]  # type: ignore[return-value]
    return gm.graph.call_function(aten.transpose.int, (x, 1, 2))


def _key_mask(gm: fx.GraphModule, mask: fx.Node, meaning: MaskMeaning, kind: str, q: fx.Node) -> fx.Node | None:
    if meaning.key_mask is not None:
        return meaning.key_mask
    if not meaning.from_mask:
        return None
    # The last query row of the [B|1, H|1, Sq, Sk] mask is the key padding (see MaskClassifier).
    g = gm.graph
    row = mask
    for _ in range(max(0, 4 - len(shape_of(mask) or ()))):
        row = g.call_function(aten.unsqueeze.default, (row, 0))
    row = g.call_function(aten.select.int, (g.call_function(aten.select.int, (row, 1, 0)), 1, -1))
    if kind == "additive":
        row = g.call_function(aten.eq.Scalar, (row, 0))
    elif kind == "fill":
        row = g.call_function(aten.logical_not.default, (row,))
    batch = g.call_function(aten.sym_size.int, (q, 0))
    return g.call_function(aten.expand.default, (row, [batch, -1]))


def _replace_output(gm: fx.GraphModule, old: fx.Node, out_bshd: fx.Node) -> None:
    """Make `old`'s users ([B, H, S, D] consumers) read the kernel's [B, S, H, D] output,
    cancelling the transpose back that HF applies right away (and no-op reshapes around it)."""
    with gm.graph.inserting_after(out_bshd):
        back = gm.graph.call_function(aten.transpose.int, (out_bshd, 1, 2))
    old.replace_all_uses_with(back)
    changed = True
    while changed:
        changed = False
        for user in list(back.users):
            if is_call(user, aten.reshape.default, aten.view.default) and _same_dims(user, old):
                user.replace_all_uses_with(back)  # reshape to the shape it already has
                gm.graph.erase_node(user)
                changed = True
            elif is_call(user, aten.transpose.int) and sorted(d % 4 for d in user.args[1:3]) == [1, 2]:
                for inner in list(user.users):
                    if is_call(inner, aten.contiguous.default):
                        inner.replace_all_uses_with(out_bshd)  # the kernel's output is contiguous
                        gm.graph.erase_node(inner)
                user.replace_all_uses_with(out_bshd)
                gm.graph.erase_node(user)
                changed = True
    if not back.users:
        gm.graph.erase_node(back)


def _same_dims(reshape: fx.Node, like: fx.Node) -> bool:
    a, b = shape_of(reshape), shape_of(like)
    return a is not None and b is not None and len(a) == len(b) and all(expr(x) == expr(y) for x, y in zip(a, b))


def _emit(gm: fx.GraphModule, anchor: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, mask: fx.Node | None,
          meaning: MaskMeaning, kind: str, scale: float, ops: object) -> None:
    with gm.graph.inserting_before(anchor):
        key_mask = _key_mask(gm, mask, meaning, kind, q) if mask is not None else None
        args = (_bshd(gm, q), _bshd(gm, k), _bshd(gm, v), key_mask, meaning.causal, scale)
        out = gm.graph.call_function(ops.attention.default, args)  # type: ignore[attr-defined]
    _replace_output(gm, anchor, out)
    erase_dead(gm, [anchor])


def _fuse_sdpa(gm: fx.GraphModule, node: fx.Node, masks: MaskClassifier, ops: object) -> bool:
    a = bound_args(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if a["dropout_p"] or not _heads_ok(q, k, v):
        return False
    if mask is None:
        sq, sk = shape_of(q), shape_of(k)
        if a["is_causal"] and expr(sq[2]) != expr(sk[2]):  # type: ignore[index]
            return False  # SDPA aligns causal masks top-left, the kernel bottom-right
        meaning, kind = MaskMeaning(bool(a["is_causal"]), None), "bool"
    else:
        if a["is_causal"]:
            return False
        kind = "bool" if dtype_of(mask) == torch.bool else "additive"
        meaning = masks.classify(mask, kind)  # type: ignore[assignment]
        if meaning is None:
            return False
    head_dim = shape_of(q)[-1]  # type: ignore[index]
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(head_dim)
    _emit(gm, node, q, k, v, mask, meaning, kind, float(scale), ops)
    return True


def _fuse_explicit(gm: fx.GraphModule, softmax: fx.Node, masks: MaskClassifier, ops: object) -> bool:
    """probs = softmax(scale * (q @ k^T) [+ mask | masked_fill]); out = probs @ v."""
    dim = softmax.args[1]
    if dim not in (-1, 3) or (softmax.target is aten._softmax.default and softmax.args[2]):
        return False
    # downstream: optional cast to the activation dtype, then probs @ v
    probs = softmax
    user = single_user(probs)
    if is_call(user, aten.to.dtype, aten._to_copy.default):
        probs, user = user, single_user(user)
    if not is_call(user, aten.matmul.default) or user.args[0] is not probs:
        return False
    pv, v = user, user.args[1]
    # upstream: scale factors, one mask, then q @ k^T
    scale, mask, kind = 1.0, None, ""
    x = softmax.args[0]
    while True:
        if not isinstance(x, fx.Node) or len(x.users) != 1:
            return False
        s = scaled(x)
        if s is not None:
            x, scale = s[0], scale * s[1]
            continue
        if mask is None and is_call(x, aten.add.Tensor) and x.kwargs.get("alpha", 1) == 1:
            lhs, rhs = x.args[:2]
            if _scores(lhs):
                x, mask = lhs, rhs
            elif _scores(rhs):
                x, mask = rhs, lhs
            else:
                return False
            kind = "additive"
            continue
        if mask is None and is_call(x, aten.masked_fill.Scalar) and (number(x.args[2]) or 0.0) <= _HIDDEN_BELOW:
            x, mask, kind = x.args[0], x.args[1], "fill"
            continue
        break
    if not is_call(x, aten.matmul.default) or not isinstance(mask, (fx.Node, type(None))):
        return False
    q, kt = x.args[:2]
    if not (is_call(kt, aten.transpose.int) and sorted(d % 4 for d in kt.args[1:3]) == [2, 3]
            and len(kt.users) == 1):
        return False
    k = kt.args[0]
    if not _heads_ok(q, k, v):  # type: ignore[arg-type]
        return False
    meaning = MaskMeaning(False, None) if mask is None else masks.classify(mask, kind)
    if meaning is None:
        return False
    _emit(gm, pv, q, k, v, mask, meaning, kind, scale, ops)  # type: ignore[arg-type]
    return True


def _scores(node: object) -> bool:
    """True when `node` is q @ k^T, possibly scaled by constants."""
    while isinstance(node, fx.Node):
        s = scaled(node)
        if s is None:
            return is_call(node, aten.matmul.default)
        node = s[0]
    return False
