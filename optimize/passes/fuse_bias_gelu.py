"""Bias + GELU fusion: `gelu(x @ W + b)` becomes a bias-free GEMM and one `kiln.bias_gelu`
that adds the bias and applies GELU in a single pass over the activations.

GELU is recognized as `aten.gelu` (erf or tanh) and as the formulas models spell out
(GPT-2's `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`, BERT's
`x * 0.5 * (1 + erf(x / sqrt(2)))`), which export as eight pointwise nodes and as many
round trips through memory.
"""

from __future__ import annotations

import math
from typing import ClassVar

from torch import fx

from optimize.passes.base import GraphPass, PassContext, attr_tensor, aten
from optimize.passes.matching import (
    close,
    erase_dead,
    is_call,
    kernel_ops,
    match_linear,
    number,
    scaled,
    shape_of,
    shifted,
)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class FuseBiasGelu(GraphPass):
    name: ClassVar[str] = "fuse_bias_gelu"
    description: ClassVar[str] = "linear bias + GELU (aten.gelu or its formula) → kiln.bias_gelu"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        ops = kernel_ops()
        counts = {"bias_gelu": 0, "gelu": 0}
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op != "call_function":
                continue
            found = match_gelu(node)
            if found is None:
                continue
            x, approximate = found
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(ops.bias_gelu.default, (x, None, approximate))
            node.replace_all_uses_with(fused)
            erase_dead(gm, [node])
            counts["bias_gelu" if _move_bias_in(gm, fused) else "gelu"] += 1
        return counts


def match_gelu(node: fx.Node) -> tuple[fx.Node, str] | None:
    """(x, approximate) when `node` computes gelu(x), as `aten.gelu` or spelled out."""
    if is_call(node, aten.gelu.default):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return node.args[0], approximate  # type: ignore[return-value]
    if not is_call(node, aten.mul.Tensor) or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    for half, one_plus in (node.args[:2], node.args[1::-1]):
        h = scaled(half)
        if h is None or not close(h[1], 0.5):
            continue
        x = h[0]
        inner = shifted(one_plus)
        if inner is None or not close(inner[1], 1.0) or len(inner[0].users) != 1 or len(one_plus.users) != 1:
            continue
        f = inner[0]
        if is_call(f, aten.erf.default) and _is_erf_arg(f.args[0], x):
            return x, "none"
        if is_call(f, aten.tanh.default) and _is_tanh_arg(f.args[0], x):
            return x, "tanh"
    return None


def _is_erf_arg(node: object, x: fx.Node) -> bool:
    s = scaled(node)
    return s is not None and s[0] is x and close(s[1], 1.0 / math.sqrt(2.0))


def _is_tanh_arg(node: object, x: fx.Node) -> bool:
    """node = sqrt(2/pi) * (x + 0.044715 * x^3)."""
    s = scaled(node)
    if s is None or not close(s[1], _SQRT_2_OVER_PI):
        return False
    inner = s[0]
    if not is_call(inner, aten.add.Tensor) or inner.kwargs.get("alpha", 1) != 1:
        return False
    a, b = inner.args[:2]
    cube = b if a is x else a if b is x else None
    c = scaled(cube)
    return c is not None and close(c[1], 0.044715) and is_call(c[0], aten.pow.Tensor_Scalar) \
        and c[0].args[0] is x and number(c[0].args[1]) == 3.0


def _move_bias_in(gm: fx.GraphModule, fused: fx.Node) -> bool:
    """When the GELU's input is (a view of) a linear with a constant bias, or `y + b` with a
    constant [N] bias, and nothing else reads it, drop the bias from the producer and let the
    kernel add it. Returns True when a bias moved."""
    x = fused.args[0]
    if not isinstance(x, fx.Node) or len(x.users) != 1:
        return False
    width = (shape_of(x) or (None,))[-1]
    if is_call(x, aten.add.Tensor) and x.kwargs.get("alpha", 1) == 1:
        for y, b in (x.args[:2], x.args[1::-1]):
            bias = attr_tensor(gm, b)
            if isinstance(y, fx.Node) and bias is not None and bias.dim() == 1 and bias.shape[0] == width:
                fused.args = (y, b, *fused.args[2:])
                gm.graph.erase_node(x)
                return True
        return False
    producer = x.args[0] if is_call(x, aten.view.default, aten.reshape.default, aten._unsafe_view.default) else x
    if not isinstance(producer, fx.Node) or len(producer.users) != 1:
        return False
    m = match_linear(gm, producer)
    bias = attr_tensor(gm, m.bias) if m is not None and m.bias is not None else None
    if m is None or bias is None or bias.shape[0] != width:
        return False
    with gm.graph.inserting_before(producer):
        if m.weight_in_out:
            bare = gm.graph.call_function(aten.mm.default, (m.x, m.weight))
        else:
            bare = gm.graph.call_function(aten.linear.default, (m.x, m.weight, None))
    producer.replace_all_uses_with(bare)
    gm.graph.erase_node(producer)
    fused.args = (bare if producer is x else x, m.bias, *fused.args[2:])
    return True
