"""What the fusion passes share: reading aten-level graph shapes, emitting replacements, and
evaluating small subgraphs on probe inputs.

Patterns are recognized by the ops and shapes in the graph (`aten.linear`, `aten.addmm` with a
constant weight, a scalar multiply, ...), never by the Python classes the model was written with,
so every Hugging Face-style encoder or decoder that lowers to the same ops is covered.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from optimize.passes.base import add_constant
from optimize.passes.base import aten, attr_tensor
from optimize.runtime.specs import TensorSpec
from optimize.sources.base import random_like_spec

HALF_DTYPES = (torch.float16, torch.bfloat16)


def kernel_ops() -> Any:
    """`torch.ops.kiln` with every kiln op registered (imported on first use: triton's
    import costs a few hundred ms that compiles without fusions should not pay)."""
    import kiln_kernels  # noqa: F401  (registers torch.ops.kiln.*)

    return torch.ops.kiln


def native_ops() -> Any:
    """`torch.ops.kiln_cuda` (packing ops; CPU references where the extension is absent)."""
    import kiln_kernels.native  # noqa: F401  (registers torch.ops.kiln_cuda.*)

    return torch.ops.kiln_cuda


def is_call(node: Any, *targets: Any) -> bool:
    """True when `node` is a call_function node of one of `targets`."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def value(node: Any) -> Any:
    """The fake value `torch.export` (or `ensure_meta`) recorded for `node`, else None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_of(node: Any) -> tuple[Any, ...] | None:
    """The recorded shape of `node` (of its first element for tuple results), else None."""
    v = value(node)
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        v = v[0]
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def token_dims(node: Any, batch: Any, seq: Any) -> int | None:
    """How `node` lays out the tokens of a [batch, seq] input (`batch` and `seq` as `expr`
    gives them): 2 for a [B, S, ...] value, 1 for a flattened [B*S, ...], None otherwise."""
    shape = shape_of(node)
    if not shape:
        return None
    if len(shape) >= 2 and expr(shape[0]) == batch and expr(shape[1]) == seq:
        return 2
    if expr(shape[0]) == batch * seq:
        return 1
    return None


def dtype_of(node: Any) -> torch.dtype | None:
    """The recorded dtype of a tensor-valued `node`, else None."""
    v = value(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def expr(size: Any) -> Any:
    """A dim as something comparable: the sympy expression of a SymInt, or the int itself."""
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def same_shape(a: Any, b: Any) -> bool:
    """True when both nodes have recorded shapes that are symbolically equal (no broadcast)."""
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sb is not None and len(sa) == len(sb) and all(
        expr(x) == expr(y) for x, y in zip(sa, sb))


def is_static(shape: Iterable[Any]) -> bool:
    """True when no dim of `shape` is symbolic (it depends on neither batch nor sequence)."""
    return all(not isinstance(d, torch.SymInt) for d in shape)


def number(arg: Any) -> float | None:
    """`arg` as a float when it is a Python number (not a bool), else None."""
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        return None
    return float(arg)


def scaled(node: Any) -> tuple[fx.Node, float] | None:
    """(x, c) when `node` computes `x * c`, `c * x` or `x / c` for a Python number c."""
    if is_call(node, aten.mul.Tensor, aten.mul.Scalar):
        a, b = node.args[:2]
        if number(b) is not None and isinstance(a, fx.Node):
            return a, number(b)  # type: ignore[return-value]
        if number(a) is not None and isinstance(b, fx.Node):
            return b, number(a)  # type: ignore[return-value]
    if is_call(node, aten.div.Tensor, aten.div.Scalar) and not node.kwargs.get("rounding_mode"):
        a, b = node.args[:2]
        if number(b) not in (None, 0.0) and isinstance(a, fx.Node):
            return a, 1.0 / number(b)  # type: ignore[operator,return-value]
    return None


def shifted(node: Any) -> tuple[fx.Node, float] | None:
    """(x, c) when `node` computes `x + c` or `c + x` for a Python number c."""
    if is_call(node, aten.add.Tensor, aten.add.Scalar) and node.kwargs.get("alpha", 1) == 1:
        a, b = node.args[:2]
        if number(b) is not None and isinstance(a, fx.Node):
            return a, number(b)  # type: ignore[return-value]
        if number(a) is not None and isinstance(b, fx.Node):
            return b, number(a)  # type: ignore[return-value]
    return None


def close(a: float | None, b: float, rel: float = 1e-4) -> bool:
    """True when the constant `a` is `b` up to the digits models spell constants with."""
    return a is not None and abs(a - b) <= rel * abs(b)


def single_user(node: fx.Node) -> fx.Node | None:
    """The only node reading `node`, or None when it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def bound_args(node: fx.Node) -> dict[str, Any]:
    """`node`'s arguments by schema name, defaults filled in (aten and custom ops)."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def ensure_meta(gm: fx.GraphModule) -> None:
    """Give every node a fake `meta["val"]` again, after earlier passes inserted nodes without
    one (shape-aware passes read shapes from it). Runs the graph on the fake inputs export
    recorded on the placeholders, so symbolic dims stay the same symbols."""
    if all("val" in n.meta for n in gm.graph.nodes if n.op in ("placeholder", "call_function", "get_attr")):
        return

    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(inputs)
    with torch.no_grad():
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def release_attrs(gm: fx.GraphModule, names: Iterable[str]) -> int:
    """Delete the weights called `names` that no `get_attr` node reads any more (a fusion
    replaced them), so re-export does not store them next to their replacement. Returns how
    many were deleted."""
    names = set(names)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and str(node.target) in names and not node.users:
            gm.graph.erase_node(node)
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    deleted = 0
    for name in names - used:
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if hasattr(owner, leaf):
            delattr(owner, leaf)
            deleted += 1
    return deleted


def erase_dead(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase `nodes` (what a rewrite replaced) and, transitively, the inputs they leave unused.

    `Node.is_impure` is not used: it keeps ops that merely may draw random numbers (SDPA, for
    its dropout), which a replaced node with dropout 0 does not; only ops that write their
    inputs and assertions are kept."""
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if node.graph is not gm.graph or node.users or node.op not in ("call_function", "get_attr"):
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is not None and (schema.is_mutable or schema.name.startswith("aten::_assert")):
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        pending.extend(inputs)


@dataclass
class LinearMatch:
    """A matrix multiply by a constant weight: `x @ W.T + b` (`aten.linear`, weight [out, in])
    or `x @ W + b` (`aten.addmm` / `aten.mm` / `aten.matmul`, weight [in, out], GPT-2's Conv1D)."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    weight_in_out: bool

    def weight_out_in(self, gm: fx.GraphModule) -> torch.Tensor:
        """The weight as [out, in] (nn.Linear layout)."""
        w = attr_tensor(gm, self.weight)
        assert w is not None
        return w.t() if self.weight_in_out else w


def match_linear(gm: fx.GraphModule, node: fx.Node) -> LinearMatch | None:
    """`node` as a `LinearMatch` when it multiplies by a constant 2-d weight (and adds a
    constant 1-d bias), else None."""
    def const(n: Any, rank: int) -> bool:
        t = attr_tensor(gm, n)
        return t is not None and t.dim() == rank and t.is_floating_point()

    if is_call(node, aten.linear.default):
        x, w = node.args[:2]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if isinstance(x, fx.Node) and const(w, 2) and (b is None or const(b, 1)):
            return LinearMatch(node, x, w, b, weight_in_out=False)
    if is_call(node, aten.addmm.default) and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        b, x, w = node.args[:3]
        if isinstance(x, fx.Node) and const(w, 2) and const(b, 1):
            return LinearMatch(node, x, w, b, weight_in_out=True)
    if is_call(node, aten.mm.default, aten.matmul.default):
        x, w = node.args[:2]
        if isinstance(x, fx.Node) and const(w, 2):
            return LinearMatch(node, x, w, None, weight_in_out=True)
    return None


def emit_linear(graph: fx.Graph, match: LinearMatch, weight: fx.Node, bias: fx.Node | None) -> fx.Node:
    """A node computing `match`'s product with `weight` (same layout as the match's) and `bias`."""
    if match.node.target is aten.linear.default:
        return graph.call_function(aten.linear.default, (match.x, weight, bias))
    if bias is not None:
        return graph.call_function(aten.addmm.default, (bias, match.x, weight))
    return graph.call_function(match.node.target, (match.x, weight))


def replace_with_items(gm: fx.GraphModule, tuple_node: fx.Node, olds: list[fx.Node | None]) -> list[fx.Node]:
    """Replace each `olds[i]` (None: no node to replace) by `tuple_node[i]`; return the new
    getitem nodes."""
    items = []
    with gm.graph.inserting_after(tuple_node):
        for i in reversed(range(len(olds))):
            items.insert(0, gm.graph.call_function(operator.getitem, (tuple_node, i)))
    for old, item in zip(olds, items):
        if old is not None:
            if "val" in old.meta:
                item.meta["val"] = old.meta["val"]
            old.replace_all_uses_with(item)
    return items


def ones_like_weight(gm: fx.GraphModule, size: int, dtype: torch.dtype, before: fx.Node) -> fx.Node:
    """A constant of ones for norms without an affine weight (the kernels always take one)."""
    return add_constant(gm, "_kiln_ones", torch.ones(size, dtype=dtype), before)


# ------------------------------------------------------------------------------------------
# Evaluating subgraphs on probe inputs
# ------------------------------------------------------------------------------------------
def ancestors(node: fx.Node) -> set[fx.Node]:
    """`node` and every node it depends on."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def evaluate(gm: fx.GraphModule, node: fx.Node, feeds: dict[str, torch.Tensor]) -> Any:
    """The value of `node` when the graph runs on `feeds` (placeholder name -> tensor),
    computing only what `node` depends on. Raises when it depends on something other than
    inputs, weights and pure ops (a submodule call)."""
    needed = ancestors(node)
    env: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            env[n] = feeds[n.target]  # type: ignore[index]
        elif n.op == "get_attr":
            env[n] = attr_tensor(gm, n)
        elif n.op == "call_function":
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
            env[n] = n.target(*args, **kwargs)  # type: ignore[operator]
        else:
            raise ValueError(f"{node.name} depends on {n.op} {n.target}")
        if n is node:
            break
    return env[node]


def probe_feeds(
    specs: list[TensorSpec], values: tuple[int, ...] = (3, 6), seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Random inputs at a few sizes inside the specs' ranges. Integers span each spec's
    `value_range`, or 0..1 without one, so anything that may be a mask gets random padding
    patterns (zeros included) rather than the rare zero of a wide range."""
    generator = torch.Generator().manual_seed(seed)
    feeds = []
    for v in values:
        sizes = {d.name: min(d.max, max(d.min, v)) for s in specs for d in s.dims}
        feeds.append({s.name: random_like_spec(s, s.concrete(sizes), generator, s.value_range or (0, 1))
                      for s in specs})
    return feeds
