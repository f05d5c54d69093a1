"""Mixed precision: in an fp16 / bf16 engine, the norms, softmaxes and reductions that are still
aten ops run in fp32 ("fp32 islands"), everything else in the reduced precision.

How the `triton` backend does reduced precision: capture casts the model's weights to fp16 /
bf16 and casts the outputs back to fp32 (`capture.CastPrecision`), so the engine's tensor
contract stays fp32 at its inputs and outputs. The fused kiln kernels (attention, LayerNorm,
bias + GELU, embedding + LayerNorm, int8 linears) already accumulate in fp32 and round once;
this pass gives the same treatment to what is left outside them, typically sentence pooling
(masked sum, L2 norm), where an fp16 sum over hundreds of tokens loses digits. Cast pairs that
round-trip through the reduced precision back to fp32 are then dropped.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx

from optimize.passes.base import GraphPass, PassContext, add_constant, attr_tensor, aten, call_nodes
from optimize.passes.matching import HALF_DTYPES, dtype_of, ensure_meta, is_call

# Ops whose accumulation must not happen in 16 bits. Single-output ops only.
FP32_OPS = (
    aten.layer_norm.default, aten.group_norm.default, aten.softmax.int, aten._softmax.default,
    aten.log_softmax.int, aten._log_softmax.default, aten.sum.default, aten.sum.dim_IntList,
    aten.mean.default, aten.mean.dim, aten.var.correction, aten.std.correction,
    aten.linalg_vector_norm.default, aten.cumsum.default, aten.prod.default, aten.logsumexp.default,
)
_CASTS = (aten.to.dtype, aten._to_copy.default)
# Cheap pointwise ops that stay in fp32 when every floating input already is (so a pooling tail
# after an fp32 sum does not drop back to 16 bits just to be cast up again at the output).
_POINTWISE = (
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.clamp.default,
    aten.clamp_min.default, aten.clamp_max.default, aten.sqrt.default, aten.rsqrt.default,
    aten.neg.default, aten.abs.default, aten.reciprocal.default,
)


def _cast_target(node: fx.Node) -> torch.dtype | None:
    if is_call(node, aten.to.dtype):
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")  # type: ignore[return-value]
    if is_call(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"}:
        return node.kwargs.get("dtype")  # type: ignore[return-value]
    return None


class MixedPrecision(GraphPass):
    name: ClassVar[str] = "mixed_precision"
    description: ClassVar[str] = "fp16/bf16 engines: norms, softmax and reductions in fp32"

    def applies(self, ctx: PassContext) -> str:
        if ctx.plan.capture == torch.float32:
            return f"precision is {ctx.plan.precision}"
        return ""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        ensure_meta(gm)
        islands = 0
        for node in call_nodes(gm, *FP32_OPS):
            low = dtype_of(node)
            if low not in HALF_DTYPES:
                continue
            with gm.graph.inserting_before(node):
                node.args = tuple(_to_fp32(gm, a, node) for a in node.args)
                node.kwargs = {k: _to_fp32(gm, a, node) for k, a in node.kwargs.items()}
            node.meta["kiln_fp32"] = True  # its recorded fake value still says 16 bits
            with gm.graph.inserting_after(node):
                back = gm.graph.call_function(aten.to.dtype, (node, low))
            back.meta["kiln_island_cast"] = True
            node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
            islands += 1
        widened = _widen(gm)
        return {"fp32_islands": islands, "fp32_pointwise": widened, "round_trips_removed": _drop_round_trips(gm)}


def _to_fp32(gm: fx.GraphModule, arg: object, anchor: fx.Node) -> object:
    if isinstance(arg, (list, tuple)):
        return type(arg)(_to_fp32(gm, a, anchor) for a in arg)
    if not isinstance(arg, fx.Node) or dtype_of(arg) not in HALF_DTYPES:
        return arg
    weight = attr_tensor(gm, arg)
    if weight is not None:
        return add_constant(gm, "_kiln_fp32", weight.float(), anchor)
    return gm.graph.call_function(aten.to.dtype, (arg, torch.float32))


def _widen(gm: fx.GraphModule) -> int:
    """Move the casts back to 16 bits that follow fp32 islands below the pointwise ops reading
    them when every floating input of such an op is fp32 already, so those ops run in fp32
    too. Returns how many moved."""
    widened = 0
    pending = [n for n in call_nodes(gm, *_CASTS) if n.meta.get("kiln_island_cast")]
    while pending:
        down = pending.pop()
        for user in list(down.users):
            if user.graph is not gm.graph or not is_call(user, *_POINTWISE) or dtype_of(user) not in HALF_DTYPES:
                continue
            if any(_is_low(a) and not _is_down_cast(a) for a in user.all_input_nodes):
                continue
            low = dtype_of(user)
            user.args, user.kwargs = fx.node.map_arg(
                (user.args, user.kwargs), lambda a: a.args[0] if _is_down_cast(a) else a)
            user.meta["kiln_fp32"] = True
            with gm.graph.inserting_after(user):
                again = gm.graph.call_function(aten.to.dtype, (user, low))
            again.meta["kiln_island_cast"] = True
            user.replace_all_uses_with(again, delete_user_cb=lambda u: u is not again)
            pending.append(again)
            widened += 1
        if not down.users:
            gm.graph.erase_node(down)
    return widened


def _is_down_cast(node: object) -> bool:
    """`to(x, fp16|bf16)` of an fp32 `x`."""
    return isinstance(node, fx.Node) and _cast_target(node) in HALF_DTYPES and _is_fp32(node.args[0])


def _is_low(node: fx.Node) -> bool:
    return dtype_of(node) in HALF_DTYPES and not node.meta.get("kiln_fp32", False)


def _is_fp32(node: object) -> bool:
    return isinstance(node, fx.Node) and (node.meta.get("kiln_fp32", False) or dtype_of(node) == torch.float32)


def _drop_round_trips(gm: fx.GraphModule) -> int:
    """to(to(x, half), fp32) with x already fp32 → x: the detour only loses bits."""
    dropped = 0
    for node in call_nodes(gm, *_CASTS):
        if node.graph is not gm.graph or _cast_target(node) != torch.float32:
            continue
        inner = node.args[0]
        if _is_down_cast(inner):
            node.replace_all_uses_with(inner.args[0])
            gm.graph.erase_node(node)
            if not inner.users:
                gm.graph.erase_node(inner)
            dropped += 1
    return dropped
